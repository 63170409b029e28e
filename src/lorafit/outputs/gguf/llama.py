"""A Hugging Face Llama model's hyper-parameters and tensors under llama.cpp's GGUF names.

What llama.cpp's `convert_hf_to_gguf.py` does for `LlamaForCausalLM`, for the models lorafit trains:
- tensor names: `model.layers.N.self_attn.q_proj.weight` -> `blk.N.attn_q.weight`, ... (see `TENSOR_NAMES`); a tied
  output head is not written (llama.cpp then uses `token_embd.weight` for it);
- the rows of `q_proj` / `k_proj` are permuted: Hugging Face's rotary embedding rotates the two halves of each head
  (`rotate_half`), llama.cpp's rotates interleaved pairs (the original Meta layout). transformers' GGUF reader undoes
  the same permutation when it loads a `llama` file;
- 1-D tensors (the RMSNorm weights) stay F32 whatever the file type, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lorafit.errors import UserError

ARCH = "llama"

# Hugging Face suffix (after `model.layers.N.`) -> GGUF name (after `blk.N.`)
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@dataclass(frozen=True)
class LlamaShape:
    n_layers: int
    hidden: int
    intermediate: int
    n_head: int
    n_kv_head: int
    head_dim: int
    context_length: int
    rms_eps: float
    rope_theta: float
    vocab_size: int
    tied: bool


def rope_theta(config) -> float:
    """transformers 5 keeps it in `rope_parameters`, 4.x in `rope_theta`."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def check_supported(model) -> LlamaShape:
    """The model's shape, or a UserError saying why this model cannot be written as a llama GGUF."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind != "llama" or type(model).__name__ != "LlamaForCausalLM":
        raise UserError(
            f"GGUF export supports Llama-architecture models (LlamaForCausalLM, model_type 'llama', e.g. SmolLM2); "
            f"this model is {type(model).__name__} (model_type {kind!r})"
        )
    problems = []
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in (None, "default"):
        problems.append(f"rope scaling {rope_type!r} (only unscaled RoPE is written so far)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention_bias / mlp_bias (bias tensors are not written so far)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (llama.cpp's llama graph uses SiLU)")
    if problems:
        raise UserError("GGUF export cannot write this Llama model faithfully: " + "; ".join(problems))
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return LlamaShape(
        n_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        n_head=n_head,
        n_kv_head=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=head_dim,
        context_length=config.max_position_embeddings,
        rms_eps=float(config.rms_norm_eps),
        rope_theta=rope_theta(config),
        vocab_size=config.vocab_size,
        tied=head is embed or (head.shape == embed.shape and torch.equal(head, embed)),
    )


def write_hparams(writer, shape: LlamaShape) -> None:
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_kv_head)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != shape.hidden // shape.n_head:  # llama.cpp derives it from these unless told
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from halves (Hugging Face) to interleaved pairs (llama.cpp): the inverse of what
    transformers' GGUF reader and llama.cpp's converter call `reverse_permute` / `permute`."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model, shape: LlamaShape) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for every tensor llama.cpp reads, in the converter's order."""
    state = model.state_dict()
    known = {f"model.layers.{i}.{suffix}" for i in range(shape.n_layers) for suffix in LAYER_TENSORS} | set(TOP_TENSORS)
    # buffers such as rotary inverse frequencies are recomputed by every loader; anything else would be lost
    unknown = sorted(k for k in state if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise UserError(f"GGUF export: the model has tensors llama.cpp's llama graph has no place for: {unknown[:5]}")
    yield TOP_TENSORS["model.embed_tokens.weight"], state["model.embed_tokens.weight"]
    for i in range(shape.n_layers):
        for suffix, name in LAYER_TENSORS.items():
            tensor = state[f"model.layers.{i}.{suffix}"]
            if suffix == "self_attn.q_proj.weight":
                tensor = permute_rows(tensor, shape.n_head)
            elif suffix == "self_attn.k_proj.weight":
                tensor = permute_rows(tensor, shape.n_kv_head)
            yield f"blk.{i}.{name}", tensor
    yield TOP_TENSORS["model.norm.weight"], state["model.norm.weight"]
    if not shape.tied:
        yield TOP_TENSORS["lm_head.weight"], state["lm_head.weight"]


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()
