"""The chunked loss equals the plain one (values and gradients), under every strategy's forward path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from engine_cases import one_thread  # noqa: F401 - autouse fixture


@pytest.fixture(scope="module")
def setup():
    from lorafit.lora import apply_lora
    from tiny import make_llama

    model = apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj", "v_proj"], seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 384, (3, 10), generator=g)
    labels = torch.randint(3, 384, (3, 10), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    return model, input_ids, labels


def _reference(model, input_ids, labels):
    logits = model(input_ids=input_ids).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum")  # fmt: skip


@pytest.mark.parametrize("chunk_tokens", [None, 4, 7, 4096])
def test_chunked_loss_matches_full_logits(setup, chunk_tokens):
    from lorafit.lora import lora_parameters
    from lorafit.training.loss import loss_forward

    model, input_ids, labels = setup
    params = lora_parameters(model)
    expected = _reference(model, input_ids, labels)
    expected_grads = torch.autograd.grad(expected, params)
    with loss_forward(model, chunk_tokens):
        got = model(input_ids=input_ids, labels=labels, attention_mask=torch.ones_like(input_ids))
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # summation order differs per chunk
    assert "forward" not in model.__dict__  # the override is gone afterwards
    assert model(input_ids=input_ids).logits.shape == (3, 10, 384)


def test_models_with_logit_softcapping_use_their_own_forward(setup):
    from lorafit.training.loss import loss_forward

    model, input_ids, labels = setup
    model.config.final_logit_softcapping = 30.0  # Llama ignores it; the loss must then come from .logits
    try:
        expected = _reference(model, input_ids, labels)
        with loss_forward(model, 4):
            got = model(input_ids=input_ids, labels=labels)
    finally:
        model.config.final_logit_softcapping = None
    torch.testing.assert_close(got, expected)
