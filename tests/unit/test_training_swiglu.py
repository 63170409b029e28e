"""The lean SwiGLU keeps two intermediates for backward instead of three and computes the same gradients."""

from __future__ import annotations

import pytest
import torch


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn()` runs (parameters included)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_silu_mul_gradients_match_autograd():
    from lorafit.training.swiglu import silu_mul

    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(4, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    up = torch.randn(4, 7, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(silu_mul, (gate, up))
    torch.testing.assert_close(silu_mul(gate, up), torch.nn.functional.silu(gate) * up)


def test_lean_mlps_switch_llama_mlps_only_while_active_and_save_less():
    from lorafit.lora import apply_lora, lora_parameters
    from lorafit.training.swiglu import lean_mlps
    from tiny import make_llama

    model = apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj", "v_proj", "down_proj"], seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(3, 384, (2, 9), generator=torch.Generator().manual_seed(1))
    params = lora_parameters(model)

    def loss():
        return model(input_ids=ids, labels=ids).loss

    expected, plain_bytes = saved_bytes(loss)
    expected_grads = torch.autograd.grad(expected, params)
    with lean_mlps(model) as switched:
        got, lean_bytes = saved_bytes(loss)
        got_grads = torch.autograd.grad(got, params)
    assert switched == len(model.model.layers)
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)
    config = model.config  # one (batch x length x intermediate) fp32 tensor less per layer
    assert plain_bytes - lean_bytes == pytest.approx(
        config.num_hidden_layers * ids.numel() * config.intermediate_size * 4, rel=0.01
    )
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored


def test_mlps_with_another_forward_or_activation_are_left_alone():
    from transformers.models.llama.modeling_llama import LlamaMLP

    from lorafit.training.swiglu import is_swiglu_mlp
    from tiny import make_llama

    mlp = make_llama().model.layers[0].mlp
    assert is_swiglu_mlp(mlp)

    class ScaledMLP(LlamaMLP):
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = ScaledMLP(make_llama().config)
    assert not is_swiglu_mlp(scaled)
    mlp.act_fn = torch.nn.GELU()
    assert not is_swiglu_mlp(mlp)


def test_every_listed_mlp_class_is_there_on_the_pinned_transformers():
    from lorafit.training.swiglu import supported_classes

    assert [c.__name__ for c in supported_classes()] == ["LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"]


@pytest.mark.parametrize("cls", __import__("lorafit.training.swiglu", fromlist=["x"]).supported_classes())
def test_each_supported_mlp_class_computes_what_its_own_forward_does(cls):
    """One check per listed class: the lean module gives the class's own output and input gradient, and is
    swapped in only while active (the original module object comes back)."""
    from transformers import AutoConfig

    from lorafit.training.swiglu import lean_mlps

    model_type = cls.__module__.rsplit("_", 1)[-1]
    config = AutoConfig.for_model(
        model_type,
        hidden_size=16,
        intermediate_size=24,
        hidden_act="silu",
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.mlp = cls(config)
    original = holder.mlp
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    holder.double()
    expected = holder.mlp(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    with lean_mlps(holder) as switched:
        assert switched == 1 and type(holder.mlp).__name__ == "LeanSwiGLU"
        got = holder.mlp(x)
        (got_grad,) = torch.autograd.grad(got.sum(), x)
    assert holder.mlp is original
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)
