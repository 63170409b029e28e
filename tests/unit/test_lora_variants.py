"""DoRA and the PiSSA/OLoRA initialisations against the real `peft` package: same weights give the same logits and
gradients, adapters load both ways, merges are exact, and a PiSSA/OLoRA adapter applies to the ORIGINAL base."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lorafit.errors import UserError
from lorafit.lora import (
    apply_lora,
    get_settings,
    load_adapter,
    lora_parameters,
    merge_and_unload,
    merge_lora,
    named_lora_parameters,
    reset_lora_parameters,
    save_adapter,
    unmerge_lora,
)
from tiny import make_llama

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
X = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def peft():
    import peft

    return peft


def perturb_trainables(model, seed=1, std=0.2):
    """Move every trainable tensor (A, B, DoRA's m) off its init, so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def peft_name(ours: str) -> str:
    if ours.endswith("lora_magnitude_vector"):
        return f"base_model.model.{ours}.default.weight"
    return "base_model.model." + ours.removesuffix(".weight") + ".default.weight"


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_same_logits_and_gradients_as_peft(peft, tmp_path, dropout):
    ours = apply_lora(make_llama(), r=4, alpha=8, target_layers=TARGETS, use_dora=True, dropout=dropout)
    perturb_trainables(ours)
    save_adapter(ours, tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4
    theirs = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "dora", is_trainable=True)
    torch.testing.assert_close(ours.eval()(X).logits, theirs.eval()(input_ids=X).logits, rtol=0, atol=1e-6)
    ours.train()
    theirs.train()
    torch.manual_seed(5)  # dropout: both draw one mask per layer in the same order
    loss_ours = ours(X, labels=X).loss
    torch.manual_seed(5)
    loss_theirs = theirs(input_ids=X, labels=X).loss
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=0, atol=1e-6)
    loss_ours.backward()
    loss_theirs.backward()
    theirs_params = dict(theirs.named_parameters())
    names = list(named_lora_parameters(ours))
    assert len(names) == 2 * 4 * 3  # layers x modules x (A, B, m)
    for name, param in names:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, theirs_params[peft_name(name)].grad, rtol=1e-4, atol=1e-6)


def test_peft_dora_adapter_loads_and_merges_exactly(peft, tmp_path):
    theirs = peft.get_peft_model(
        make_llama(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=True, use_rslora=True)
    )
    perturb_trainables(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(make_llama(), tmp_path / "peft")
    settings = get_settings(ours)
    assert settings.use_dora and settings.use_rslora
    expected = theirs.eval()(input_ids=X).logits
    torch.testing.assert_close(ours(X).logits, expected, rtol=0, atol=1e-6)
    # merging: the same weights PEFT's merge gives, and the same logits as the unmerged model
    merged = merge_and_unload(copy.deepcopy(ours))
    peft_merged = theirs.merge_and_unload()
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, peft_merged.state_dict()[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(merged(X).logits, expected, rtol=0, atol=1e-5)
    # merge then unmerge restores the base (the norm of the unmerged weight is kept for that)
    before = {n: p.clone() for n, p in ours.named_parameters()}
    merge_lora(ours)
    torch.testing.assert_close(ours(X).logits, expected, rtol=0, atol=1e-5)
    unmerge_lora(ours)
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(("init", "rslora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_decomposing_init_matches_peft_and_its_adapter_applies_to_the_original_base(peft, tmp_path, init, rslora):
    original = make_llama()
    ours = apply_lora(make_llama(), r=4, alpha=8, target_layers=TARGETS, init=init, use_rslora=rslora)
    theirs = peft.get_peft_model(
        make_llama(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, use_rslora=rslora),
    )
    # PEFT's initial factors and residual base, and the model still computes the original function
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        key = (
            peft_name(name)
            if param.requires_grad
            else "base_model.model." + name.replace("proj.weight", "proj.base_layer.weight")
            if any(t in name for t in TARGETS)
            else "base_model.model." + name
        )
        torch.testing.assert_close(param, theirs_params[key], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(ours(X).logits, original(X).logits, rtol=0, atol=1e-5)
    # a second (seeded) reset decomposes the original weight again, not the residual
    residual = ours.model.layers[0].self_attn.q_proj.weight.clone()
    reset_lora_parameters(ours, seed=3)
    torch.testing.assert_close(ours.model.layers[0].self_attn.q_proj.weight, residual, rtol=0, atol=1e-5)
    # train a few steps, then the saved (converted) adapter on the ORIGINAL base gives the trained model's logits
    optimizer = torch.optim.AdamW(lora_parameters(ours), lr=1e-2)
    ours.train()
    for _ in range(3):
        ours(X, labels=X).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = ours.eval()(X).logits
    assert (trained - original(X).logits).abs().max() > 1e-2  # it trained
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * (2**0.5 if rslora else 2))
    in_peft = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "adapter").eval()
    torch.testing.assert_close(in_peft(input_ids=X).logits, trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(load_adapter(make_llama(), tmp_path / "adapter")(X).logits, trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(merge_and_unload(copy.deepcopy(ours))(X).logits, trained, rtol=0, atol=1e-5)


def test_variant_errors_name_the_cause(peft, tmp_path):
    with pytest.raises(UserError, match=r"use_dora supports? nn.Linear targets only.*embed_tokens \(Embedding\)"):
        apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj", "embed_tokens"], use_dora=True)
    with pytest.raises(UserError, match="init pissa support"):
        apply_lora(make_llama(), r=4, alpha=8, target_layers=["embed_tokens"], init="pissa")
    with pytest.raises(UserError, match="cannot be combined with use_dora"):
        apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj"], init="olora", use_dora=True)
    # PEFT saves a PiSSA adapter unconverted unless asked: it only fits the residual base, so it is refused
    unconverted = peft.get_peft_model(
        make_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    )
    unconverted.save_pretrained(tmp_path / "unconverted")
    with pytest.raises(UserError, match="init_lora_weights.*path_initial_model_for_weight_conversion"):
        load_adapter(make_llama(), tmp_path / "unconverted")
