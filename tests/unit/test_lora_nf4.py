"""A 4-bit (NF4, torchao) frozen base: storage, training, exact resume, merging, and a plain PEFT adapter."""

from __future__ import annotations

import json

import pytest
import torch

from engine_cases import TARGETS, TokenDataset, make_job
from lorafit.errors import UserError
from lorafit.frozen.linear import has_low_precision_frozen
from lorafit.frozen.nf4 import dequantize_nf4_linears, has_nf4, is_nf4, store_nf4_linears
from lorafit.lora import apply_lora, lora_parameters, merge_and_unload, save_adapter
from tiny import make_llama

X = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))


def nf4_lora(use_dora=False):
    model = apply_lora(make_llama(), r=4, alpha=8, target_layers=TARGETS, use_dora=use_dora, seed=3)
    assert store_nf4_linears(model) == 2 * 7  # every linear of the 2 blocks; not the (tied) head
    return model


def rounded_base():
    """The same base with its linear weights NF4-rounded, as a plain fp32 model (what PEFT gets)."""
    model = make_llama().requires_grad_(False)  # only frozen weights are stored as NF4
    assert store_nf4_linears(model) == 2 * 7
    dequantize_nf4_linears(model)
    return model.requires_grad_(True)


def test_storage_is_4_bit_and_computes_with_the_dequantised_weights():
    model = nf4_lora()
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "NF4Linear"  # not adapted: swapped for the class
    q = model.model.layers[0].self_attn.q_proj
    assert is_nf4(q.weight) and not q.weight.requires_grad
    assert not is_nf4(model.lm_head.weight) and has_low_precision_frozen(model)  # so FSDP2 refuses it
    stored = q.weight.quantized_data.nbytes + q.weight.quantized_scalers.nbytes + q.weight.quantization_factor.nbytes
    assert stored <= q.weight.numel() * 4 / 7  # 4 bits per value plus double-quantised scales, vs 32
    full = make_llama()
    logits = model(X).logits
    assert (logits - full(X).logits).abs().max() < 0.1 * full(X).logits.abs().max()  # rounded, not broken
    torch.testing.assert_close(logits, rounded_base()(X).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_trains_merges_and_saves_a_plain_peft_adapter(tmp_path, use_dora):
    import peft

    model = nf4_lora(use_dora)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(X, labels=X).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    trained = model(X).logits
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is use_dora and "quantization" not in json.dumps(config)
    in_peft = peft.PeftModel.from_pretrained(rounded_base(), tmp_path / "adapter").eval()
    torch.testing.assert_close(in_peft(input_ids=X).logits, trained, rtol=0, atol=1e-5)
    merged = merge_and_unload(model)  # dequantises: a plain fp32 transformers model
    kinds = {type(m).__name__ for m in merged.modules()}
    assert not has_nf4(merged) and not kinds & {"NF4Linear", "LoraLinear"} and "Linear" in kinds
    torch.testing.assert_close(merged(X).logits, trained, rtol=0, atol=1e-5)


@pytest.mark.integration  # two runs of the training loop
def test_resumes_exactly(tmp_path):
    from lorafit.distributed.env import init_distributed
    from lorafit.training.loop import train

    env = init_distributed()
    held_out = {"held_out": TokenDataset(n=3, seed=1)}
    straight = train(
        make_job(
            tmp_path / "a",
            env,
            micro=2,
            accum=1,
            steps=4,
            model=nf4_lora(),
            checkpointing_interval_in_steps=2,
            eval_datasets=held_out,
        )
    )
    resumed = train(
        make_job(
            tmp_path / "b",
            env,
            micro=2,
            accum=1,
            steps=4,
            model=nf4_lora(),
            resume_from=tmp_path / "a" / "checkpoints" / "step_000002",
            eval_datasets=held_out,
        )
    )
    assert [s for s, _ in resumed.losses] == [3, 4]
    assert [v for _, v in resumed.losses] == pytest.approx([v for _, v in straight.losses[2:]], abs=1e-6, rel=0)
    checkpoint = tmp_path / "a" / "checkpoints" / "step_000002"
    assert sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) < 1_000_000  # never the base


def test_component_refuses_nf4_with_a_decomposing_init():
    from lorafit.lora.component import LoraModelConfig, build_lora_model

    values = dict(r=4, alpha=8, target_layers=["q_proj"], dropout=0.0, use_rslora=False, use_dora=False)
    config = LoraModelConfig.model_construct(model=make_llama(), init="pissa", frozen_dtype="nf4", **values)
    with pytest.raises(UserError, match="init: init pissa cannot be combined with frozen_dtype nf4"):
        build_lora_model(config)


def _component(**changes):
    from lorafit.lora.component import LoraModelConfig

    values = dict(r=4, alpha=8, target_layers=TARGETS, dropout=0.0, use_rslora=False, use_dora=False, init="kaiming")
    return LoraModelConfig.model_construct(model=make_llama(), **{**values, **changes})


def test_nf4_skip_layers_stay_bf16_and_the_rest_is_4_bit():
    from lorafit.frozen.linear import store_frozen_linears
    from lorafit.lora.component import build_lora_model

    model = build_lora_model(_component(frozen_dtype="nf4", nf4_skip_layers=["q_proj", "mlp.gate_proj"]))
    for block in model.model.layers:
        assert block.self_attn.q_proj.weight.dtype == torch.bfloat16 and not is_nf4(block.self_attn.q_proj.weight)
        gate = block.mlp.gate_proj
        assert type(gate).__name__ == "FrozenLinear" and gate.weight.dtype == torch.bfloat16
        assert is_nf4(block.self_attn.v_proj.weight) and type(block.mlp.up_proj).__name__ == "NF4Linear"
    # the same function as the base with those layers rounded to bf16 and the others to NF4 (what the adapter sees)
    reference = make_llama().requires_grad_(False)
    skipped = {f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.gate_proj")}
    store_frozen_linears(reference, torch.bfloat16, only=skipped)
    store_nf4_linears(reference, skip=skipped)
    torch.testing.assert_close(model(X).logits, reference(X).logits, rtol=0, atol=1e-5)  # B = 0: the base alone


def test_nf4_skip_layers_is_checked():
    from lorafit.lora.component import build_lora_model

    with pytest.raises(UserError, match="nf4_skip_layers: only applies with frozen_dtype: nf4"):
        build_lora_model(_component(frozen_dtype="bfloat16", nf4_skip_layers=["q_proj"]))
    with pytest.raises(UserError, match=r"nf4_skip_layers\[1\]: 'qproj' .*did you mean 'q_proj'"):
        build_lora_model(_component(frozen_dtype="nf4", nf4_skip_layers=["q_proj", "qproj"]))
    # the head, an embedding or a whole attention block would be kept as they are anyway: named, not ignored
    entries = ["lm_head", "embed_tokens", "self_attn", "re:("]
    with pytest.raises(UserError) as refused:
        build_lora_model(_component(frozen_dtype="nf4", nf4_skip_layers=entries))
    message = str(refused.value)
    assert all(f"nf4_skip_layers[{i}]: '{entry}'" in message for i, entry in enumerate(entries)), message
    assert "selects no layer that frozen_dtype nf4 stores in 4-bit" in message and "not a valid regular" in message


@pytest.mark.parametrize(
    "frozen",
    [{"frozen_dtype": "nf4", "nf4_skip_layers": ["q_proj"]}, {"frozen_dtype": "bfloat16"}],
    ids=["nf4 + bf16", "bf16"],
)
def test_merge_and_unload_of_a_low_precision_base_is_one_fp32_model(frozen):
    from lorafit.lora.component import build_lora_model

    model = build_lora_model(_component(**frozen))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    trained = model(X).logits
    merged = merge_and_unload(model)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert {type(m).__name__ for m in merged.modules()} & {"NF4Linear", "FrozenLinear", "LoraLinear"} == set()
    torch.testing.assert_close(merged(X).logits, trained, rtol=0, atol=1e-5)
