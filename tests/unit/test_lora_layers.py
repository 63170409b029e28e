"""LoRA layers on a tiny Llama / GPT-2: zero start, dropout, dtype/device, meta conversion, freezing, merging."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lorafit.errors import UserError
from lorafit.lora import (
    LoraConv1D,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    apply_lora,
    count_parameters,
    describe_lora,
    lora_layers,
    lora_parameters,
    merge_and_unload,
    merge_lora,
    reset_lora_parameters,
    trainable_summary,
    unmerge_lora,
)
from tiny import llama_config, make_gpt2, make_llama

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokens(batch=2, length=12, vocab=384, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model, seed=1, std=0.2):
    """B starts at zero; give every factor real values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_fresh_adapter_computes_exactly_the_base_model():
    base = make_llama()
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8, target_layers=[*ALL_LLAMA, "embed_tokens"])
    x = tokens()
    assert torch.equal(model(x).logits, base(x).logits)
    # not trivially: A (Linear) and B (Embedding) are non-zero, the other factor is zero
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.abs().sum() > 0 and q.lora_B.weight.abs().sum() == 0
    emb = model.model.embed_tokens
    assert emb.lora_embedding_B.abs().sum() > 0 and emb.lora_embedding_A.abs().sum() == 0


def test_numbers_are_checked_at_each_public_edge_once():
    """A layer made directly checks its numbers (the classes are public: a clear error, not ZeroDivisionError);
    apply_lora checks once for all layers and builds them with `from_checked`; the typed model/lora config checks
    the same rules with pydantic, before anything is built."""
    from lorafit.config.graph import ConfigGraph
    from lorafit.lora.kinds import wrap

    for cls, base in [(LoraLinear, nn.Linear(4, 4)), (LoraEmbedding, nn.Embedding(5, 4)), (LoraConv1D, None)]:
        if base is None:
            from transformers.pytorch_utils import Conv1D

            base = Conv1D(4, 4)
        with pytest.raises(UserError, match=r"r: must be an integer >= 1, got 0"):
            cls(base, r=0, alpha=8)
    with pytest.raises(UserError, match=r"alpha: must be a finite number"):
        LoraLinear(nn.Linear(4, 4), r=2, alpha=float("inf"))
    calls = []
    original = LoraLinear.__init__
    LoraLinear.__init__ = lambda self, *a, **k: calls.append(a) or original(self, *a, **k)
    try:
        apply_lora(make_llama(), r=2, alpha=4, target_layers=["q_proj", "v_proj"], warn_save_pretrained=False)
        assert isinstance(wrap(nn.Linear(4, 4), 2, 4.0, dropout=0.0, use_rslora=False, init="kaiming"), LoraLinear)
    finally:
        LoraLinear.__init__ = original
    assert calls == []  # injection does not run the constructor's check per layer
    base = {"component_key": "model", "variant_key": "huggingface_config_model", "config": {"model_type": "llama"}}
    numbers = {"r": 0, "alpha": 8, "target_layers": ["q_proj", " "], "init": "pissa", "use_dora": True}
    lora = {"component_key": "model", "variant_key": "lora", "config": {"model": base, **numbers}}
    messages = [f"{p.path}: {p.message}" for p in ConfigGraph({"model": lora}).check()]
    assert any(m.startswith("model.config.r:") for m in messages), messages
    assert any("model.config.target_layers" in m and "non-empty" in m for m in messages), messages
    assert any("model.config.use_dora" in m and "cannot be combined with use_dora" in m for m in messages), messages


def test_layer_shapes_scaling_and_forward_formula():
    base = nn.Linear(16, 24)
    ref = copy.deepcopy(base)
    layer = LoraLinear(base, r=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias  # taken over, not copied
    assert layer.lora_A.weight.shape == (4, 16) and layer.lora_B.weight.shape == (24, 4)
    assert layer.scaling == 2.0
    assert LoraLinear(nn.Linear(16, 24), r=4, alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(4))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 16)
    expected = ref(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2.0
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert isinstance(layer, nn.Linear) and layer.lora_dropout is None  # p=0: no module call at all


def test_kaiming_and_gaussian_init_follow_peft():
    linear = LoraLinear(nn.Linear(64, 8), r=16, alpha=16)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt 5) on (r, in)
    a = linear.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    gauss = LoraLinear(nn.Linear(256, 256), r=16, alpha=16, init="gaussian")
    assert gauss.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.1)
    assert gauss.lora_B.weight.abs().sum() == 0


def test_dropout_only_on_the_adapter_branch():
    base = nn.Linear(8, 8)
    layer = LoraLinear(copy.deepcopy(base), r=2, alpha=2, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 8)
    layer.train()
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    expected = base(x) + F.linear(F.linear(dropped, layer.lora_A.weight), layer.lora_B.weight)
    torch.testing.assert_close(out, expected)
    layer.eval()  # no dropout at all in eval
    expected = base(x) + F.linear(F.linear(x, layer.lora_A.weight), layer.lora_B.weight)
    torch.testing.assert_close(layer(x), expected)


def test_base_names_unchanged_and_only_lora_trains():
    base = make_llama()
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8, target_layers=["q_proj", "v_proj"])
    keys = set(model.state_dict())
    assert set(base.state_dict()) <= keys  # a base checkpoint loads by the same keys
    new = sorted(keys - set(base.state_dict()))
    assert len(new) == 8 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in new)
    model.load_state_dict(base.state_dict(), strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(new)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie survives injection
    n_lora = 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # per layer: q 32->32, v 32->16 (2 KV heads)
    total = sum(p.numel() for p in base.parameters()) + n_lora
    assert count_parameters(model) == (n_lora, total)
    assert trainable_summary(model) == f"trainable params: {n_lora:,} / {total:,} ({100 * n_lora / total:.2f}%)"


def test_bf16_base_trains_with_bf16_adapters():
    model = make_llama().to(torch.bfloat16)
    apply_lora(model, r=4, alpha=8, target_layers=["q_proj", "v_proj", "down_proj"], seed=0)
    frozen = model.model.layers[0].self_attn.q_proj.weight.clone()
    assert {p.dtype for p in lora_parameters(model)} == {torch.bfloat16}
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=2e-2)
    x = tokens()
    model.train()
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0] - 0.05
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, frozen)


def test_meta_conversion_then_load_and_reset():
    from transformers import LlamaForCausalLM

    base = make_llama()
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config())
    apply_lora(model, r=4, alpha=8, target_layers=["q_proj", "embed_tokens"])
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.device.type == "meta" and q.weight.device.type == "meta"
    assert "model.layers.1.self_attn.q_proj" in describe_lora(model)  # validate works without memory
    model.to_empty(device="cpu")
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all("lora_" in k for k in result.missing_keys) and len(result.missing_keys) == 6
    for name, buffer in base.named_buffers():  # non-persistent rotary buffers are not in the state dict
        model.get_buffer(name).copy_(buffer)
    reset_lora_parameters(model, seed=0)
    x = tokens()
    torch.testing.assert_close(model.eval()(x).logits, base(x).logits, rtol=0, atol=0)
    assert q.lora_A.weight.abs().sum() > 0


def test_seeded_reset_is_reproducible_across_dtypes():
    one = apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj"], seed=3)
    two = apply_lora(make_llama().to(torch.bfloat16), r=4, alpha=8, target_layers=["q_proj"], seed=3)
    three = apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj"], seed=4)
    a1, a2, a3 = (m.model.layers[1].self_attn.q_proj.lora_A.weight for m in (one, two, three))
    assert torch.equal(a1.to(torch.bfloat16), a2)
    assert not torch.equal(a1, a3)


def test_train_and_eval_never_merge():
    model = apply_lora(make_llama(), r=4, alpha=8, target_layers=ALL_LLAMA)
    randomise_adapters(model)
    weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = tokens()
    model.train()
    model.eval()
    out = model(x).logits
    assert not any(layer.merged for _, layer in lora_layers(model))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if not p.requires_grad)
    merge_lora(model)  # the unmerged eval path equals the merged model
    torch.testing.assert_close(model(x).logits, out, rtol=0, atol=1e-5)


def test_merge_unmerge_and_unload_fp32():
    model = apply_lora(make_llama(), r=4, alpha=8, target_layers=ALL_LLAMA)
    randomise_adapters(model)
    x = tokens()
    unmerged = model(x).logits
    w0 = model.model.layers[0].mlp.down_proj.weight.clone()
    merge_lora(model)
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, w0)
    torch.testing.assert_close(model(x).logits, unmerged, rtol=0, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x).logits, unmerged, rtol=0, atol=1e-5)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any("lora" in k for k in plain.state_dict()) and not hasattr(plain, "lora_config")
    torch.testing.assert_close(plain(x).logits, unmerged, rtol=0, atol=1e-5)


def test_bf16_merge_adds_an_fp32_delta_rounded_once():
    model = apply_lora(make_llama().to(torch.bfloat16), r=4, alpha=8, target_layers=["o_proj"])
    randomise_adapters(model)
    layer = model.model.layers[0].self_attn.o_proj
    w = layer.weight.clone()
    delta = (layer.lora_B.weight.float() @ layer.lora_A.weight.float()) * layer.scaling
    merge_lora(model)
    assert torch.equal(layer.weight, (w.float() + delta).to(torch.bfloat16))


def test_merge_refuses_non_finite_and_tied_weights():
    model = apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj"])
    randomise_adapters(model)
    before = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"non-finite weights in model\.layers\.1\.self_attn\.q_proj"):
        merge_lora(model)
    assert all(torch.equal(a, b) for a, b in zip(before[:3], list(model.parameters())[:3], strict=True))
    assert not any(layer.merged for _, layer in lora_layers(model))

    tied = apply_lora(make_llama(), r=4, alpha=8, target_layers=["embed_tokens"])
    with pytest.raises(UserError, match=r"model\.embed_tokens\.weight is tied to lm_head\.weight"):
        merge_and_unload(tied)


def test_embedding_lora_merges_when_untied():
    model = apply_lora(make_llama(tie_word_embeddings=False), r=4, alpha=8, target_layers=["embed_tokens", "q_proj"])
    assert isinstance(model.model.embed_tokens, LoraEmbedding)
    assert model.model.embed_tokens.lora_embedding_A.shape == (4, 384)
    randomise_adapters(model)
    x = tokens()
    out = model(x).logits
    plain = merge_and_unload(model)
    assert type(plain.model.embed_tokens) is nn.Embedding
    assert plain.model.embed_tokens.padding_idx == 0
    torch.testing.assert_close(plain(x).logits, out, rtol=0, atol=1e-5)


def test_gpt2_conv1d_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D

    base = make_gpt2()
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8, target_layers=["c_attn", "c_proj"])
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraConv1D) and layer.weight.shape == (32, 96)  # Conv1D stores (in, out)
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (96, 4)
    x = tokens(vocab=128)
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=0, atol=0)
    randomise_adapters(model, std=0.1)
    out = model(x).logits
    assert not torch.allclose(out, base(x).logits, atol=1e-3)
    text = describe_lora(model)
    # `c_proj` hits the attention and the MLP projection: the summary shows both places
    places = "transformer.h.*.attn.c_proj (2), transformer.h.*.mlp.c_proj (2)"
    assert f"target 'c_proj': 4 modules in 2 places: {places}" in text
    plain = merge_and_unload(model)
    assert type(plain.transformer.h[1].mlp.c_proj) is Conv1D
    torch.testing.assert_close(plain(x).logits, out, rtol=0, atol=1e-5)


def test_a_seeded_adapter_is_drawn_once_when_created():
    """apply_lora(seed) draws A and B once, as the layers are made, from one generator in model order: the global
    RNG is untouched and a re-draw from the same seed (what a meta build does after sharding) gives the same."""
    from lorafit.lora import named_lora_parameters

    model = make_llama()
    before = torch.random.get_rng_state()
    apply_lora(model, r=4, alpha=8, target_layers=["q_proj", "embed_tokens"], seed=5, warn_save_pretrained=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    drawn = {name: p.detach().clone() for name, p in named_lora_parameters(model)}
    assert any(t.abs().sum() > 0 for t in drawn.values())
    reset_lora_parameters(model, seed=5)
    assert all(torch.equal(drawn[name], p) for name, p in named_lora_parameters(model))
