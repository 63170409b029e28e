"""Frozen base weights stored in bfloat16 and computed in the input's precision (fp32): half the base's memory.

LoRA trains A and B. A frozen base weight W is only ever used in y = x W^T and, in backward, in g W. Stored in
bf16, W takes half the memory. `frozen_linear` casts it up to the input's dtype where it is used, one layer's
weight at a time; the cast costs a few percent of the matmul. The autograd function saves the bf16 W for
backward, not its fp32 copy. F.linear on an upcast copy would keep that copy alive until backward, and nothing
would be saved.

Numerics: the base is rounded to bf16 once (8 bits of mantissa), as if it had been loaded in bf16. The adapter,
the activations and the arithmetic stay fp32. The output head (tied to the embeddings in most small models) and
the embeddings keep their dtype: the head runs inside the fused loss, and the embeddings are a lookup.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F  # noqa: N812 - the universal spelling
from torch import nn


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


def _frozen_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return frozen_linear(x, self.weight, self.bias)


def store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights of `model`'s linear layers (not the output head) in `dtype`; how many changed.

    The Parameter objects stay the same (names, tying and optimizer references are unchanged); only their
    data changes dtype. `store_frozen_linears(model, torch.float32)` undoes it (the bf16 rounding stays).
    """
    from lorafit.lora.layers import LoraLinear

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    changed = 0
    for module in model.modules():
        if type(module) not in (nn.Linear, LoraLinear) or module is head or module.weight.requires_grad:
            continue
        if module.weight.dtype == dtype:
            continue
        module.weight.data = module.weight.data.to(dtype)
        changed += 1
        if type(module) is nn.Linear and "forward" not in module.__dict__:  # LoraLinear calls frozen_linear itself
            module.forward = types.MethodType(_frozen_forward, module)
    if changed:
        _release_file_mapping(model)
    return changed


def _release_file_mapping(model: nn.Module) -> None:
    """Copy the tensors that still live in a memory-mapped weights file into memory of their own.

    from_pretrained maps a safetensors file and leaves the parameters in it. Converting a weight reads
    (makes resident) its pages, and the mapping holds all of them until its last tensor is gone: without this,
    the fp32 file pages of the converted weights would stay in the process next to their bf16 copies.
    """
    ranges = _file_mapped_ranges()
    if not ranges:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            address = tensor.untyped_storage().data_ptr()
            if tensor.device.type == "cpu" and any(lo <= address < hi for lo, hi in ranges):
                tensor.data = tensor.data.clone()


def _file_mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed memory mappings (Linux; elsewhere none)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def has_low_precision_frozen(model: nn.Module) -> bool:
    """True when some frozen weights are stored in another dtype than the trainable ones (see above)."""
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    return bool(trainable) and bool(frozen - trainable)
