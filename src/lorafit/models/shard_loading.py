"""Base weights for a model built on the meta device, read after FSDP2 has sharded it (`lorafit run` under fsdp2).

Every rank reads from the weights file only the part of each tensor that its shard holds, so no rank ever
holds the whole model (the memory per rank scales with 1 / world size; benchmarks/fsdp2_meta_memory.py):

    build on meta (model builders call `defer_weights` instead of loading) -> inject LoRA -> shard
    -> `to_empty` -> `load_shards` (here) -> rotary tables -> seeded adapters (lorafit/run/build.py)

Safetensors are read with `safe_open(...).get_slice` (only the slice's bytes), torch files (`.bin` / `.pt` in
torch.save's zip format) through a memory map that is dropped after each tensor, so the pages a rank touched do
not stay resident. Keys and shapes are checked when the builder records the file, before anything is sharded,
with the messages of a full load (`weights.key_problems`); tied parameters (lm_head = embed_tokens) are one
parameter in the sharded model and are read once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorafit.errors import UserError
from lorafit.models.weights import _as_state_dict, _read_torch, key_problems, resolve_weights_path, retie, tied_groups
from lorafit.models.wrappers import is_dtensor

_ATTR = "_lorafit_weights_after_sharding"


@dataclass(frozen=True, eq=False)
class FileTensor:
    """One tensor of a weights file, read in parts (`index`: one slice per dimension)."""

    file: Path
    key: str
    shape: tuple[int, ...]

    def read(self, index: tuple[slice, ...]) -> torch.Tensor:
        if self.file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(self.file), framework="pt", device="cpu") as f:
                return f.get_slice(self.key)[index] if index else f.get_tensor(self.key)
        # a fresh memory map per tensor: the pages read here leave the process with the map (a map kept open
        # for the whole load would keep every page a rank touched resident)
        tensors = _as_state_dict(_read_torch(self.file, None), self.file, None)
        return tensors[self.key][index].clone()


@dataclass(frozen=True)
class WeightFile:
    """What a builder would have loaded into the model: parameter / buffer name -> tensor in the file."""

    source: str  # the path as the config names it, for messages
    tensors: dict[str, FileTensor]
    tied: list[list[str]]  # names of parameters that were one tensor when the file was recorded


def file_tensors(path: str | Path, *, field: str | None = None) -> dict[str, FileTensor]:
    """The tensors of a weights file (or a Hugging Face folder's, sharded or not) by name, without their data."""
    found: dict[str, FileTensor] = {}
    for file in resolve_weights_path(path, field=field):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    found.update({k: FileTensor(file, k, tuple(f.get_slice(k).get_shape())) for k in f.keys()})  # noqa: SIM118 - safe_open is no dict
            except Exception as e:  # SafetensorError, OSError: the library's message says which part is broken
                raise UserError(
                    f"cannot read {file}: not a valid safetensors file (truncated or corrupt?): {e}", field=field
                ) from None
        else:
            tensors = _as_state_dict(_read_torch(file, field), file, field)  # memory-mapped: no data is read
            found.update({k: FileTensor(file, k, tuple(v.shape)) for k, v in tensors.items()})
    return found


def defer_weights(
    model: nn.Module, tensors: dict[str, FileTensor], *, source: str, field: str | None = None
) -> nn.Module:
    """Record `tensors` (named as the model's state dict) as `model`'s weights, to be read after sharding.

    `model` is on the meta device. Keys and shapes are checked now, every problem in one UserError.
    """
    tensors = dict(tensors)
    problem = key_problems(model, tensors, source)  # also fills a tied partner the file keeps once
    if problem:
        raise UserError(problem, field=field)
    setattr(model, _ATTR, WeightFile(source, tensors, tied_groups(model)))
    return model


def is_meta(model: nn.Module) -> bool:
    """Built on the meta device: parameters without data."""
    return any(p.is_meta for p in model.parameters())


def weight_file(model: nn.Module) -> WeightFile | None:
    """The file recorded by `defer_weights`, if the model still waits for its weights."""
    return getattr(model, _ATTR, None)


def _local_part(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's tensor behind `tensor` and where it sits in the whole (an FSDP2 DTensor: its shard)."""
    if is_dtensor(tensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        # DCP's own helper for "which part of the global tensor is mine" (any placement, uneven shards)
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        local = tensor.to_local()
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(f"local shard {tuple(local.shape)} is not the expected {tuple(shape)}")
        return local, tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    return tensor, tuple(slice(0, n) for n in tensor.shape)


@torch.no_grad()
def load_shards(model: nn.Module) -> list[str]:
    """Fill `model`'s parameters and persistent buffers (sharded or not, materialised with `to_empty`) from the
    file `defer_weights` recorded, each rank reading only its part; returns the names of what it filled.
    Names absent from the file (LoRA's A/B, DoRA's magnitude) are left to their own initialisation."""
    recorded = weight_file(model)
    if recorded is None:
        raise RuntimeError("load_shards: no weights file was recorded for this model (defer_weights)")
    tensors = recorded.tensors
    for group in recorded.tied:  # FSDP2 keeps them one parameter; a plain module's `to_empty` unties them
        if len({id(model.get_parameter(name)) for name in group}) > 1:
            retie(model, [group])
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    filled: list[str] = []
    differs: list[str] = []
    for name, param in model.named_parameters():  # a tied parameter once, under its first name
        if name not in tensors:
            continue
        local, index = _local_part(param)
        if not local.numel():
            filled.append(name)
            continue
        values = tensors[name].read(index)
        local.copy_(values)
        filled.append(name)
        for other in names_of[id(param)][1:]:  # the file may hold a tied tensor twice: both must agree
            partner = tensors[other]
            stored_twice = (partner.file, partner.key) != (tensors[name].file, tensors[name].key)
            if stored_twice and not torch.equal(partner.read(index), values):
                differs.append(f"{name} and {other}")
        del values
    for name, buffer in model.named_buffers():
        if name in tensors:
            buffer.copy_(tensors[name].read(tuple(slice(0, n) for n in buffer.shape)))
            filled.append(name)
    if _any_rank(bool(differs)):
        raise UserError(
            f"{recorded.source}: the model ties {differs[0] if differs else 'two parameters'} (one tensor), but the "
            "file holds different values for them; was it saved from a model with untied embeddings?"
        )
    delattr(model, _ATTR)
    return filled


def _any_rank(flag: bool) -> bool:
    """`flag` or'ed over the ranks, so that every rank raises together (none waits in a later collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    nccl = dist.get_backend() == "nccl"  # it reduces only CUDA tensors: this rank's device
    value = torch.tensor([int(flag)], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
