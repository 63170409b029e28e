"""SwiGLU MLPs that keep two intermediates for backward instead of three.

A Llama-style MLP computes down(silu(gate(x)) * up(x)). Autograd keeps three tensors of the intermediate size
per token and layer: gate(x) for silu's backward, and silu(gate(x)) and up(x) for the product's. That is the
largest saved activation of a LoRA step: 270 of 465 MiB on SmolLM2-135M at 2 x 256 tokens. silu(gate) can be
recomputed from gate in a few elementwise operations, so `silu_mul` saves only gate and up, and backward
recomputes the sigmoid. That saves 90 MiB there.

`lean_mlps(model)` applies it while training: it swaps each MLP of a class listed in `supported_classes` (Llama,
and so SmolLM2; Mistral; Qwen2; Qwen3) whose activation is SiLU for a `LeanSwiGLU` holding the same three
projections, and swaps the original back afterwards. Any other MLP keeps its own module.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F  # noqa: N812 - the universal spelling
from torch import nn


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        grad_up = grad * gate * sig if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:  # d silu(g)/dg = sig * (1 + g * (1 - sig))
            grad_gate = grad * up * sig * (1 + gate * (1 - sig))
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, keeping only gate and up for backward."""
    return _SiluMul.apply(gate, up)


# The transformers MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)), each checked
# by a test against its own forward (tests/unit/test_training_swiglu.py). An MLP of any other class (a subclass
# included: it may change forward) keeps its own module. Imported by name, not by a string path, so the list is
# plain code that a reader (and the import audit in test_error_corpus.py) can follow.
@functools.cache
def supported_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from transformers.models.llama.modeling_llama import LlamaMLP

        classes.append(LlamaMLP)
        from transformers.models.mistral.modeling_mistral import MistralMLP

        classes.append(MistralMLP)
        from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

        classes.append(Qwen2MLP)
        from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

        classes.append(Qwen3MLP)
    except ImportError:  # an older transformers without the later models: keep the ones it has
        pass
    return tuple(classes)


class LeanSwiGLU(nn.Module):
    """Stands in for a supported MLP while training: the same gate/up/down modules (so the same parameter
    names), `silu_mul` between them."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.original = [mlp]  # in a list: not a submodule, so its parameters are not listed twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def is_swiglu_mlp(module: nn.Module) -> bool:
    """True for an MLP of a supported class whose activation is SiLU (the config may choose another one)."""
    from transformers.activations import SiLUActivation

    return type(module) in supported_classes() and isinstance(getattr(module, "act_fn", None), nn.SiLU | SiLUActivation)


@contextlib.contextmanager
def lean_mlps(model: nn.Module) -> Iterator[int]:
    """While active, `model`'s supported SwiGLU MLPs are replaced by `LeanSwiGLU`; yields how many."""
    switched = [(name, module) for name, module in model.named_modules() if is_swiglu_mlp(module)]
    for name, module in switched:
        model.set_submodule(name, LeanSwiGLU(module))
    try:
        yield len(switched)
    finally:
        for name, module in switched:
            model.set_submodule(name, module)
