"""lorafit's LoRA against the LoRA code of Modalities' `lora` and `lora_2` branches (vendored unchanged in
tests/modalities_ref/lora_branch/, loaded by tests/support/lora_branch.py; it needs only torch): the same forward,
gradients and merged weights for Linear and Embedding layers, and checkpoints both ways: lorafit loads what the
branch's model writes, and the branch's model loads what `lorafit export modalities --form lora` writes.

Modalities keeps the Hugging Face model as `huggingface_model` of its wrapper; a module holding the model under that
name gives the state-dict names Modalities' wrapper gives (the modalities tier does the same inside modalities
0.5.0's own wrapper: tests/e2e/test_modalities_fidelity.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_branch import BRANCHES, load_lora_branch
from lorafit.lora import apply_lora, lora_layers, merge_lora
from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.layers import LoraLinear
from lorafit.modalities.export import lora_state_dict
from lorafit.models.checkpointed import TorchCheckpointLoader
from tiny import make_llama

R, ALPHA = 4, 8
TARGETS = ["q_proj", "v_proj", "embed_tokens"]


class Holder(nn.Module):
    """What Modalities' HuggingFacePretrainedModel is to a state dict: the model as `huggingface_model`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.huggingface_model = model


def _random_(*tensors: torch.Tensor, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(torch.randn(tensor.shape, generator=generator))


def _pair(kind: str, branch: str):
    """(lorafit's layer, the branch's layer) with the same base weights and the same non-zero A and B."""
    layers = load_lora_branch(branch).lora_layers
    torch.manual_seed(0)
    if kind == "Linear":
        base = nn.Linear(12, 10)
        ours = LoraLinear(nn.Linear(12, 10), R, ALPHA)
        theirs = layers.LoRALinear(12, 10, r=R, lora_alpha=ALPHA)
        pairs = [(ours.lora_A.weight, theirs.lora_A), (ours.lora_B.weight, theirs.lora_B)]
        with torch.no_grad():
            for layer in (ours, theirs):
                layer.weight.copy_(base.weight)
                layer.bias.copy_(base.bias)
    else:
        base = nn.Embedding(30, 10)
        ours = LoraEmbedding(nn.Embedding(30, 10), R, ALPHA)
        theirs = layers.LoRAEmbedding(30, 10, r=R, lora_alpha=ALPHA)
        pairs = [(ours.lora_embedding_A, theirs.lora_A), (ours.lora_embedding_B, theirs.lora_B)]
        with torch.no_grad():
            for layer in (ours, theirs):
                layer.weight.copy_(base.weight)
    for i, (a, b) in enumerate(pairs):
        assert a.shape == b.shape  # PEFT's shapes are the branch's: A (r, in), B (out, r)
        _random_(a, seed=i)
        with torch.no_grad():
            b.copy_(a)
    return ours, theirs, pairs


@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("kind", ["Linear", "Embedding"])
def test_forward_gradients_and_merged_weights_equal_the_branch(branch, kind):
    ours, theirs, pairs = _pair(kind, branch)
    assert theirs.scaling == ours.scaling == ALPHA / R
    x = torch.randn(3, 5, 12) if kind == "Linear" else torch.randint(0, 30, (3, 5))
    outputs = []
    for layer in (ours, theirs):
        layer.train()
        inputs = x.clone().requires_grad_(True) if kind == "Linear" else x
        out = layer(inputs)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outputs.append((out.detach(), inputs.grad if kind == "Linear" else None))
    assert torch.equal(outputs[0][0], outputs[1][0])
    if kind == "Linear":
        assert torch.equal(outputs[0][1], outputs[1][1])
    for a, b in pairs:
        assert torch.equal(a.grad, b.grad)

    theirs.eval()  # the branch merges on eval(): W + (B A) * alpha / r (transposed for the embedding)
    merge_lora(ours)
    assert torch.equal(ours.weight, theirs.weight)


def _branch_model(branch: str, seed: int = 1) -> Holder:
    model = make_llama(seed=seed, tie_word_embeddings=False)
    return Holder(load_lora_branch(branch).utils.convert_to_lora(model, r=R, alpha=ALPHA, target_layers=TARGETS))


@pytest.mark.parametrize("branch", BRANCHES)
def test_lorafit_loads_a_checkpoint_the_branch_model_writes(branch, tmp_path):
    theirs = _branch_model(branch)
    _random_(*[p for n, p in theirs.named_parameters() if "lora_" in n], seed=3)
    path = tmp_path / "eid_x-model-num_steps_1-num_tokens_8.bin"
    torch.save(theirs.state_dict(), path)  # what the branch's FSDPCheckpointSaving saves: the full state dict
    assert "huggingface_model.model.layers.0.self_attn.q_proj.lora_A" in torch.load(path)

    ours = apply_lora(
        make_llama(seed=2, tie_word_embeddings=False),
        r=R,
        alpha=ALPHA,
        target_layers=TARGETS,
        warn_save_pretrained=False,
    )
    TorchCheckpointLoader(device="cpu").load(ours, path)
    x = torch.randint(0, 300, (2, 9))
    theirs.train()
    assert torch.equal(ours(x).logits, theirs.huggingface_model(x).logits)


@pytest.mark.parametrize("branch", BRANCHES)
def test_the_branch_model_loads_the_lora_form_export(branch):
    ours = apply_lora(
        make_llama(seed=2, tie_word_embeddings=False),
        r=R,
        alpha=ALPHA,
        target_layers=TARGETS,
        warn_save_pretrained=False,
    )
    _random_(*[p for _, layer in lora_layers(ours) for p in layer.lora_factors()], seed=5)
    state, spec = lora_state_dict(ours)
    assert (spec.r, spec.alpha, spec.target_layers) == (R, ALPHA, sorted(TARGETS))

    theirs = _branch_model(branch, seed=1)
    theirs.load_state_dict(state, strict=True)  # Modalities' checkpoint loading is a strict load_state_dict
    x = torch.randint(0, 300, (2, 9))
    expected = ours(x).logits
    theirs.train()  # the adapters apart
    assert torch.equal(theirs.huggingface_model(x).logits, expected)
    theirs.eval()  # merged by the branch itself
    torch.testing.assert_close(theirs.huggingface_model(x).logits, expected, rtol=0, atol=1e-5)


def test_the_lora_branch_converting_a_lora_model_again_draws_fresh_adapters():
    """What docs/modalities.md says of the `lora` branch's seed config: its torch loading converts the model to LoRA
    before loading, and its `lora_model` converts the loaded LoRA layers again (each is a leaf named like its
    target), with fresh A and B = 0: the loaded adapters are gone."""
    utils = load_lora_branch("lora").utils
    model = utils.convert_to_lora(make_llama(seed=1), r=2, alpha=1, target_layers=["q_proj"])
    loaded = model.model.layers[0].self_attn.q_proj
    _random_(loaded.lora_B, seed=4)
    utils.convert_to_lora(model, r=2, alpha=1, target_layers=["q_proj"])
    again = model.model.layers[0].self_attn.q_proj
    assert again is not loaded and not again.lora_B.any() and torch.equal(again.weight, loaded.weight)
