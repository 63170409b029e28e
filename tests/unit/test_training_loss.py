"""The chunked loss equals the plain one (values and gradients), under every strategy's forward path."""

from __future__ import annotations

import pytest
import torch


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
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk_tokens", [None, 4, 7, 4096])
def test_chunked_loss_matches_full_logits(setup, chunk_tokens):
    from lorafit.lora import lora_parameters
    from lorafit.training.loss import CausalLMLoss

    model, input_ids, labels = setup
    params = lora_parameters(model)
    expected = _reference(model, input_ids, labels)
    expected_grads = torch.autograd.grad(expected, params)
    mask = torch.ones_like(input_ids)
    got = CausalLMLoss(model, chunk_tokens)(input_ids=input_ids, labels=labels, attention_mask=mask)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # summation order differs per chunk
    assert "forward" not in model.__dict__  # the model itself is untouched
    assert model(input_ids=input_ids).logits.shape == (3, 10, 384)


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["lm_head"], ["embed_tokens"]])
def test_adapters_on_an_untied_head_or_the_embeddings_get_the_reference_gradients(targets):
    """LoRA on lm_head (untied) goes through the head module, so its adapter trains; LoRA on embed_tokens too."""
    from lorafit.lora import apply_lora, named_lora_parameters
    from lorafit.training.loss import CausalLMLoss
    from tiny import make_llama

    model = apply_lora(make_llama(tie_word_embeddings=False), r=4, alpha=8, target_layers=targets, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # the factors that start at zero: make them act
                p.normal_(0, 0.1)
    names, params = zip(*named_lora_parameters(model), strict=True)
    ids = torch.randint(3, 384, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    expected_grads = torch.autograd.grad(_reference(model, ids, labels), params)
    got_grads = torch.autograd.grad(CausalLMLoss(model, 4)(input_ids=ids, labels=labels), params)
    for name, a, b in zip(names, got_grads, expected_grads, strict=True):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lora_on_a_tied_head_is_refused_with_the_reason():
    from lorafit.errors import UserError
    from lorafit.lora import apply_lora
    from tiny import make_llama

    with pytest.raises(UserError, match="lm_head shares its weight with the input embeddings"):
        apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj", "lm_head"], seed=0)


def test_models_with_logit_softcapping_use_their_own_forward(setup):
    from lorafit.training.loss import CausalLMLoss

    model, input_ids, labels = setup
    model.config.final_logit_softcapping = 30.0  # Llama ignores it; the loss must then come from .logits
    try:
        expected = _reference(model, input_ids, labels)
        got = CausalLMLoss(model, 4)(input_ids=input_ids, labels=labels)
    finally:
        model.config.final_logit_softcapping = None
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_head_loss_gives_every_gradient_of_a_trainable_head(bias):
    """Full fine-tuning: hidden states, head weight (tied to the embeddings here) and bias all get CE's gradient."""
    from lorafit.training.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=bias)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[1, 2:] = -100
    inputs = [hidden, *head.parameters()]
    expected = torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.5, inputs)
    got = linear_cross_entropy(hidden, head, labels, chunk_tokens=3)
    got_grads = torch.autograd.grad(got * 0.5, inputs)  # the incoming gradient scales the stored ones
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        torch.testing.assert_close(linear_cross_entropy(hidden, head, labels, chunk_tokens=4), expected)


def test_fused_head_loss_with_no_target_is_zero_and_still_differentiable():
    from lorafit.training.loss import linear_cross_entropy

    hidden = torch.randn(2, 3, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.nn.Linear(4, 6), torch.full((2, 3), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(hidden.grad) == 0


@pytest.mark.parametrize("mean", ["token_mean", "batch_mean"])
def test_held_out_loss_is_the_token_mean_or_modalities_mean_of_batch_means(setup, mean):
    """batch_mean (Modalities' evaluator): each batch's token-mean cross-entropy, averaged over the batches of the
    eval loader's own batch size; token_mean: all target tokens of the set at once."""
    import contextlib

    from lorafit.distributed.env import DistEnv
    from lorafit.training.batches import held_out_losses
    from lorafit.training.loss import CausalLMLoss

    model, input_ids, labels = setup
    dataset = [{"input_ids": i, "labels": lab} for i, lab in zip(input_ids, labels, strict=True)]

    def collate(items):
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    got = held_out_losses(
        CausalLMLoss(model), {"val": dataset}, env, 3, None, contextlib.nullcontext, collate, {"val": 2}, mean
    )["val"]
    with torch.no_grad():
        sums = [_reference(model, input_ids[s], labels[s]) for s in (slice(0, 2), slice(2, 3))]
    counts = [(labels[s] != -100).sum() for s in (slice(0, 2), slice(2, 3))]
    if mean == "batch_mean":  # batches of 2 (the loader's size, not the micro batch 3): samples [0, 1], [2]
        expected = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    else:
        expected = (sums[0] + sums[1]) / (counts[0] + counts[1])
    assert got == pytest.approx(float(expected), rel=1e-5)
