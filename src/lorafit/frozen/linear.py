"""Frozen base weights stored in bfloat16 and computed in the input's precision (fp32): half the base's memory.

LoRA trains A and B. A frozen base weight W is only ever used in y = x W^T and, in backward, in g W. Stored in
bf16, W takes half the memory. `frozen_linear` casts it up to the input's dtype where it is used, one layer's
weight at a time; the cast costs a few percent of the matmul. The autograd function saves the bf16 W for
backward, not its fp32 copy. F.linear on an upcast copy would keep that copy alive until backward, and nothing
would be saved.

`store_frozen_linears` swaps each frozen plain `nn.Linear` for a `FrozenLinear` (same Parameter objects, so
names, tying and checkpoints are unchanged) and converts its weight; layers that already compute through
`frozen_linear` (`FrozenWeightLayer`: the LoRA linear layer) only have their weight converted. Another storage
(e.g. 4-bit) is a subclass of `FrozenLinear` with its own `forward`.

Numerics: the base is rounded to bf16 once (8 bits of mantissa), as if it had been loaded in bf16. The adapter,
the activations and the arithmetic stay fp32. The output head (tied to the embeddings in most small models) and
the embeddings keep their dtype: the head runs inside the fused loss, and the embeddings are a lookup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the universal spelling
from torch import nn

from lorafit.models.file_pages import drop_file_pages, has_plain_storage, release_file_mapping


class _UpcastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return (grad @ weight.to(grad.dtype)) if ctx.needs_input_grad[0] else None, None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, with a frozen weight of another dtype than `x` cast up where it is used."""
    if weight.dtype == x.dtype or weight.requires_grad or not weight.is_floating_point():
        return F.linear(x, weight, bias)
    return _UpcastLinear.apply(x, weight, bias)


class FrozenWeightLayer:
    """A linear layer whose forward computes through `frozen_linear`: its frozen weight may be stored in another
    dtype than its input (a mixin; `FrozenLinear` and the LoRA linear layer are such layers)."""


class FrozenLinear(FrozenWeightLayer, nn.Linear):
    """nn.Linear whose frozen weight is stored in a lower precision and cast up where it is used."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: names, tying and optimizer references are unchanged
        self.register_parameter("bias", base.bias)
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)

    def to_base(self) -> nn.Linear:
        """A plain nn.Linear owning this layer's Parameters."""
        return plain_linear(self)


def frozen_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of `model`'s linear layers with a frozen weight, the output head excepted (it stays as
    the loss needs it): what `store_frozen_linears` and `store_nf4_linears` convert."""
    head = output_head(model)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and not module.weight.requires_grad
    ]


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection (`get_output_embeddings()`), which frozen-weight storage leaves as it is."""
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def plain_linear(layer: nn.Linear) -> nn.Linear:
    """A plain nn.Linear owning `layer`'s weight/bias Parameters (the same objects: names, tying and optimizer
    references are unchanged), in `layer`'s train/eval mode."""
    with torch.device("meta"):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight = layer.weight
    plain.register_parameter("bias", layer.bias)
    return plain.train(layer.training)


def store_frozen_linears(
    model: nn.Module, dtype: torch.dtype, only: set[str] | None = None, *, release_file: bool = True
) -> int:
    """Store the frozen weights of `model`'s linear layers (not the output head; with `only`, those of these
    qualified names) in `dtype`; how many changed.

    Plain nn.Linear layers become `FrozenLinear`. `store_frozen_linears(model, torch.float32)` undoes it (the
    layers become plain nn.Linear again; the bf16 rounding stays). `release_file=False` leaves the other weights
    in the loaded file's memory mapping, for a conversion of the rest that follows (see `release_file_mapping`).
    """
    changed = 0
    for name, module in frozen_linears(model):
        if only is not None and name not in only:
            continue
        if type(module) is nn.Linear and dtype != torch.float32:
            module = FrozenLinear(module)
            model.set_submodule(name, module)
        elif type(module) is FrozenLinear and dtype == torch.float32:
            module = module.to_base()
            model.set_submodule(name, module)
        elif not isinstance(module, FrozenWeightLayer):
            continue  # a Linear subclass with a forward of its own: its weight stays as it is
        if module.weight.dtype == dtype:
            continue
        stored = module.weight.data
        module.weight.data = stored.to(dtype)
        drop_file_pages(stored)  # the weight as loaded is unused now: its file pages leave before the next is read
        changed += 1
    if changed and release_file:
        release_file_mapping(model)
    return changed


def has_low_precision_frozen(model: nn.Module) -> bool:
    """True when some frozen weights are stored in another dtype than the trainable ones (see above), or in a
    tensor subclass of their own (NF4, frozen/nf4.py: an NF4Tensor reports its outer dtype). For an unsharded model."""
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    other_storage = any(not has_plain_storage(p) for p in frozen)
    return bool(trainable) and (bool({p.dtype for p in frozen} - trainable) or other_storage)
