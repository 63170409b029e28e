"""A 4-bit frozen base (QLoRA-style, `frozen_dtype: nf4`): the frozen linear weights stored as torchao's NF4Tensor.

Why torchao: it is PyTorch's own quantisation library, its NF4Tensor runs on CPU (plain torch ops, no custom kernel),
it installs beside torch 2.13.0 without replacing it (26 MB), and torchtune's QLoRA uses the same tensor. bitsandbytes'
CPU backend was the other candidate; it was not measured here.

How it computes: an NF4Tensor is a torch tensor subclass that implements `F.linear` (dequantise to the input's dtype,
then a plain matmul; backward to the input only). Plain frozen linears are swapped for `NF4Linear` (a `FrozenLinear`,
lorafit/frozen/linear.py); the LoRA linear layer keeps its class and hands the NF4 weight to F.linear. Each weight
takes ~4.1 bits (64-value blocks, double-quantised scales) instead of 32. Adapters stay fp32 and are saved in
plain PEFT LoRA format.

Memory while quantising: from_pretrained leaves a safetensors file's weights in a memory mapping of the file, so
the fp32 model is not in the process's memory after loading, only the pages that were read. Quantising reads each
weight, and its pages would stay resident (counted in the peak RSS) until the whole mapping is released: the fp32
linear weights all at once, next to their NF4 copies. `store_nf4_linears` hands each weight's pages back as soon
as it is quantised (`drop_file_pages`), so one fp32 weight at a time is resident. A weights file that
from_pretrained converts (e.g. bf16 on disk, `dtype: fp32`) or a .bin file is read into memory whole by
transformers before lorafit sees it: then the peak is that of the loaded model.

What it does not do: the output head and embeddings keep their dtype (as with `frozen_dtype: bfloat16`); a weight
whose size is not a multiple of 64 stays unquantised. Merging dequantises first (lorafit/lora/merging.py), so a
merged export is the NF4-rounded base plus the adapter, in fp32. torchao's NF4Tensor.clone re-quantises with default
block sizes (inexact, and failing for most SmolLM2 shapes), so models are dequantised before being copied.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F  # noqa: N812 - the universal spelling
from torch import nn

from lorafit.errors import UserError
from lorafit.frozen.linear import FrozenLinear, FrozenWeightLayer, frozen_linears
from lorafit.models.file_pages import drop_file_pages, release_file_mapping
from lorafit.third_party_noise import quiet_torchao_import

NF4_BLOCK = 64  # values per absmax block (QLoRA's choice)
_MAX_SCALER_BLOCK = 256  # absmax values per double-quantisation block (QLoRA's choice)
_NEAREST_CHUNK = 1 << 16  # values per step of torchao's nearest-level search (see to_nf4)


def _nf4_module():
    try:
        with quiet_torchao_import():  # its harmless CUDA-library warnings, not the user's loggers changed for good
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:
        raise UserError("frozen_dtype nf4 needs torchao: pip install 'lorafit[nf4]' (or torchao==0.18.0)") from None
    return nf4_tensor


def is_nf4(tensor: torch.Tensor) -> bool:
    if "torchao" not in sys.modules:  # nothing can be NF4 without it; and importing it costs seconds
        return False
    return isinstance(tensor, _nf4_module().NF4Tensor)


def _scaler_block(n_blocks: int) -> int:
    """The largest divisor of `n_blocks` up to 256: torchao needs the block count divisible by it."""
    return next(d for d in range(min(_MAX_SCALER_BLOCK, n_blocks), 0, -1) if n_blocks % d == 0)


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as an NF4Tensor (blocks of 64, scales double-quantised in blocks of up to 256)."""
    module = _nf4_module()
    n_blocks = weight.numel() // NF4_BLOCK
    # torchao finds each value's nearest NF4 level over CHUNK_SIZE values at a time, with two fp32 temporaries of
    # 16 values per element: 128 MB at its default 1M, more than the 4-bit base of SmolLM2-135M itself; 64K values
    # keep them at 8 MB. The chunks only split that search: the bits are the same (tests/unit/test_lora_nf4_loading.py)
    chunk, module.CHUNK_SIZE = module.CHUNK_SIZE, min(module.CHUNK_SIZE, _NEAREST_CHUNK)
    try:
        return module.to_nf4(weight.detach().to(torch.float32), NF4_BLOCK, _scaler_block(n_blocks))
    finally:
        module.CHUNK_SIZE = chunk


class NF4Linear(FrozenLinear):
    """A frozen nn.Linear whose weight is an NF4Tensor (swapped in by `store_nf4_linears`, same Parameter names).

    F.linear on an NF4Tensor dequantises it to the input's dtype and multiplies (torchao implements F.linear for
    it, backward to the input only), so this forward is plain F.linear; the class marks what the layer holds.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight=nf4"


def store_nf4_linears(model: nn.Module, skip: set[str] = frozenset()) -> int:
    """Store the frozen weights of `model`'s linear layers (not the output head, nor the qualified names in
    `skip`) as NF4; how many changed.

    Plain nn.Linear layers become `NF4Linear`; layers that compute through `frozen_linear` (the LoRA linear
    layer) keep their class, since `frozen_linear` hands an NF4 weight to F.linear too.
    """
    changed = 0
    for name, module in frozen_linears(model):
        weight = module.weight
        if name in skip or is_nf4(weight) or weight.device.type == "meta" or weight.numel() % NF4_BLOCK:
            continue
        if type(module) in (nn.Linear, FrozenLinear):
            module = NF4Linear(module)
            model.set_submodule(name, module)
        elif not isinstance(module, FrozenWeightLayer):
            continue  # a Linear subclass with a forward of its own: its weight stays as it is
        module.weight = nn.Parameter(to_nf4(weight), requires_grad=False)
        drop_file_pages(weight)  # this fp32 weight is now unused: its file pages leave the process before the next
        changed += 1
    if changed:
        release_file_mapping(model)
    return changed


def dequantize_nf4_linears(model: nn.Module) -> int:
    """Replace every NF4 weight by its dequantised fp32 value (a plain Parameter; NF4Linear becomes nn.Linear)."""
    changed = 0
    for name, module in list(model.named_modules()):
        weight = module._parameters.get("weight")
        if weight is None or not is_nf4(weight):
            continue
        module.weight = nn.Parameter(weight.to(torch.float32), requires_grad=False)
        if type(module) is NF4Linear:
            model.set_submodule(name, module.to_base())
        changed += 1
    return changed


def has_nf4(model: nn.Module) -> bool:
    return any(is_nf4(p) for p in model.parameters())
