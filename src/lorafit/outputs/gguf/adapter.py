"""`lorafit export gguf-adapter`: a LoRA adapter alone as a llama.cpp GGUF LoRA adapter (`--lora`, `Llama(lora_path=)`,
Ollama's `ADAPTER`), as llama.cpp's `convert_lora_to_gguf.py` writes one from a PEFT adapter.

What llama.cpp reads (src/llama-adapter.cpp): `general.type = adapter`, `general.architecture` equal to the base
model's, `adapter.type = lora`, `adapter.lora.alpha`, and for each adapted base tensor `<gguf name>.lora_a` (A, shape
(r, in)) and `<gguf name>.lora_b` (B, shape (out, r)). It applies `W x + B (A x) * alpha / r`, with r read from B.
- The Q/K row permutation of the base file (llama.py) applies to B's rows, the output side, as the converter does.
- rsLoRA's scale alpha / sqrt(r) is written as the alpha that gives it under llama.cpp's alpha / r (alpha * sqrt(r)):
  the file then means what the adapter means (the converter writes PEFT's alpha and would scale rsLoRA wrongly).
- What llama.cpp cannot apply is refused: DoRA, adapters on the embedding or on a tied output head.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from lorafit.errors import UserError
from lorafit.lora import get_settings
from lorafit.lora.layers import LoraLinear
from lorafit.lora.model import lora_layers
from lorafit.lora.variants import DECOMPOSING_INITS
from lorafit.models.wrappers import canonical_name, full_tensor
from lorafit.outputs.gguf.llama import ARCH, LAYER_TENSORS, TOP_TENSORS, check_supported, permute_rows
from lorafit.outputs.gguf.output import check_output, gguf_file

DTYPES = ("f32", "f16")


def _gguf_name(module: str, shape) -> str:
    """llama.cpp's name of the base tensor that `module` (a qualified Linear name) holds."""

    weight = module + ".weight"
    if weight == "lm_head.weight":
        if shape.tied:
            raise UserError(
                "GGUF adapter: the adapter changes lm_head, which this model ties to the embedding; a "
                "llama.cpp adapter cannot change the output head alone (merge instead: lorafit export "
                "gguf --adapter)"
            )
        return TOP_TENSORS[weight]
    parts = weight.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 3 and ".".join(parts[3:]) in LAYER_TENSORS:
        return f"blk.{parts[2]}.{LAYER_TENSORS['.'.join(parts[3:])]}"
    raise UserError(
        f"GGUF adapter: {module} has no llama.cpp tensor an adapter can apply to (llama.cpp adapts the "
        "attention and MLP projections and an untied output head)"
    )


def adapter_tensors(model, shape) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """(alpha for llama.cpp, [(GGUF name, fp32 tensor)]) of the adapter on `model`."""

    settings = get_settings(model)
    if settings.use_dora:
        raise UserError(
            "GGUF adapter: llama.cpp applies plain LoRA only; a DoRA adapter must be merged "
            "(lorafit export gguf --adapter) instead"
        )
    if settings.init in DECOMPOSING_INITS:  # its base is a residual: the saved (converted) folder is what applies
        raise UserError(
            f"GGUF adapter: a {settings.init} model in memory adapts a residual base; save the adapter "
            "(lorafit.save_adapter converts it) and export from that folder"
        )
    tensors, alphas = [], set()
    for name, layer in lora_layers(model):
        module = canonical_name(name)
        if not isinstance(layer, LoraLinear):
            raise UserError(
                f"GGUF adapter: {module} is a {type(layer).__name__}; llama.cpp adapters hold LoRA on "
                "linear layers only (merge instead: lorafit export gguf --adapter)"
            )
        target = _gguf_name(module, shape)
        a, b = (full_tensor(t).detach().to("cpu", torch.float32) for t in layer.lora_factors())
        if target.endswith("attn_q.weight"):
            b = permute_rows(b, shape.n_head)
        elif target.endswith("attn_k.weight"):
            b = permute_rows(b, shape.n_kv_head)
        tensors += [(target + ".lora_a", a.contiguous()), (target + ".lora_b", b.contiguous())]
        alphas.add(layer.scaling * layer.r)  # llama.cpp's scale is alpha / r
    if not tensors:
        raise UserError("GGUF adapter: the model has no LoRA layer")
    if len(alphas) > 1:
        raise UserError(f"GGUF adapter: the layers' scales differ ({sorted(alphas)}); llama.cpp has one alpha")
    alpha = alphas.pop()
    return (float(round(alpha)) if math.isclose(alpha, round(alpha)) else alpha), tensors


@torch.no_grad()
def export_gguf_adapter(
    model, output: str | os.PathLike, *, dtype: str = "f32", overwrite: bool = False, name: str | None = None
) -> Path:
    """Write the LoRA adapter on `model` (a LlamaForCausalLM with LoRA) to the GGUF adapter file `output`."""
    import gguf

    output = Path(output)
    check_output(output, overwrite=overwrite, dtype=dtype, valid=DTYPES, example="adapter.gguf")
    shape = check_supported(model)
    alpha, tensors = adapter_tensors(model, shape)
    numpy_type = {"f32": "float32", "f16": "float16"}[dtype]

    with gguf_file(output, ARCH) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name or output.stem)
        for tensor_name, tensor in tensors:
            writer.add_tensor(tensor_name, tensor.numpy().astype(numpy_type))
    return output


__all__ = ["DTYPES", "adapter_tensors", "export_gguf_adapter"]
