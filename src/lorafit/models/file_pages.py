"""The pages of a memory-mapped weights file, handed back to the kernel as the weights read from it are converted.

from_pretrained maps a safetensors file and leaves the parameters in it. Converting the weights one by one (to bf16
or NF4, lorafit/frozen/) reads each, and a file mapping keeps every page read resident until the whole mapping
goes: without this, the fp32 pages of every converted weight would stay in the process beside their converted
copies. Linux only (/proc/self/maps, madvise); elsewhere nothing is done.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch
from torch import nn

_DONTNEED = 4  # MADV_DONTNEED (Linux)
_COPY_SLICE_BYTES = 4 << 20


def has_plain_storage(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s values are its own storage: a plain tensor or Parameter, not a tensor subclass that keeps
    them in inner tensors (torchao's NF4Tensor, DTensor)."""
    return type(tensor.data) is torch.Tensor


def release_file_mapping(model: nn.Module) -> None:
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
            if not has_plain_storage(tensor):  # a subclass keeps its data in inner tensors (NF4: just created)
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
