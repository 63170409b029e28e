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

import ctypes
import mmap
import sys

import torch
import torch.nn.functional as F  # noqa: N812 - the universal spelling
from torch import nn

_DONTNEED = 4  # MADV_DONTNEED (Linux)
_COPY_SLICE_BYTES = 4 << 20


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
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head and not module.weight.requires_grad]  # fmt: skip


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


def release_file_mapping(model: nn.Module) -> None:
    """Copy the tensors that still live in a memory-mapped weights file into memory of their own.

    from_pretrained maps a safetensors file and leaves the parameters in it. Converting a weight reads
    (makes resident) its pages, and the mapping holds all of them until its last tensor is gone: without this,
    the fp32 file pages of the converted weights would stay in the process next to their bf16 copies.
    """
    from lorafit.frozen.nf4 import is_nf4

    ranges = _file_mapped_ranges()
    if not ranges:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if is_nf4(tensor):  # a tensor subclass without storage of its own; its parts were just created
                continue
            address = tensor.untyped_storage().data_ptr()
            if tensor.device.type == "cpu" and any(lo <= address < hi for lo, hi in ranges):
                tensor.data = _copy_out_of_file(tensor.data, ranges)


def _copy_out_of_file(mapped: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """A copy of file-mapped `mapped` in memory of its own, made slice by slice, each slice's file pages dropped
    once copied: the copy and the whole original (the 113 MB embedding of SmolLM2) are never resident together."""
    if not mapped.is_contiguous():
        copy = mapped.clone()
        drop_file_pages(mapped, ranges)
        return copy
    copy = torch.empty_like(mapped)
    source, target = mapped.view(-1), copy.view(-1)
    step = max(1, _COPY_SLICE_BYTES // mapped.element_size())
    for start in range(0, source.numel(), step):
        target[start : start + step] = source[start : start + step]
        drop_file_pages(source[start : start + step], ranges)
    return copy


def drop_file_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]] | None = None) -> None:
    """Hand the memory pages of a file-mapped `tensor` that is no longer used back to the kernel (Linux only).

    A file mapping's pages stay resident, counted in the process's RSS, once read, until the whole mapping goes:
    converting the weights of a mapped file one by one would otherwise end with all of them resident at once.
    Only pages wholly inside the tensor's bytes are dropped (no neighbour is touched), and only in a file
    mapping, whose pages the kernel re-reads from the file if they are ever touched again: no value changes.
    """
    if tensor.device.type != "cpu" or sys.platform != "linux" or tensor.untyped_storage().nbytes() == 0:
        return
    page = mmap.PAGESIZE
    start = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
    first, last = -(-start // page) * page, (start + tensor.numel() * tensor.element_size()) // page * page
    ranges = _file_mapped_ranges() if ranges is None else ranges
    if last > first and any(lo <= first and last <= hi for lo, hi in ranges):
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _DONTNEED)


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
    from lorafit.frozen.nf4 import has_nf4

    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    return bool(trainable) and (bool(frozen - trainable) or has_nf4(model))  # NF4Tensor reports its outer dtype
