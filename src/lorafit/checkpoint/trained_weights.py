"""The trained weights at the end of a run: `adapter/` (LoRA, PEFT's format) or `model/` (full fine-tuning, a
Hugging Face folder), gathered from the ranks first, and the unsharded copy rank-0 evaluators use.

Under FSDP2 each rank holds a slice of every parameter: saving what rank 0 sees would silently write a slice
(accelerate PR 4206, axolotl issue 3772), so the full tensors are gathered (a collective every rank joins)
and rank 0 writes. Under DDP or on one process the model itself is complete and is saved as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit.atomic import atomic_folder
from lorafit.distributed.env import DistEnv
from lorafit.distributed.parallel import gather_adapter_state_dict, gather_full_state_dict
from lorafit.lora import apply_lora, get_settings, has_lora, save_adapter
from lorafit.lora.adapter import PREFIX
from lorafit.models.wrappers import is_dtensor, unwrap

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


@dataclass
class TrainedWeights:
    adapter_dir: Path | None = None  # written on rank 0 (LoRA)
    model_dir: Path | None = None  # written on rank 0 (full fine-tuning)
    full_state_dict: dict[str, torch.Tensor] | None = None  # rank 0, when a sharded model was gathered


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def write_trained_weights(
    model: nn.Module, env: DistEnv, run_dir: Path, *, write: bool = True, keep_full: bool = False, tokenizer: Any = None
) -> TrainedWeights:
    """Write `run_dir/adapter/` (a LoRA model) or `run_dir/model/` (any other) on rank 0; collective.

    `keep_full`: also return the gathered full state dict of a sharded model (for `TrainResult.model_for_eval`).
    `write=False` writes nothing (benchmarks). `tokenizer` is saved beside a full model so the folder is complete,
    and into the adapter folder, so the adapter carries the chat template it was trained with (as transformers'
    Trainer saves its tokenizer with an adapter; PEFT and transformers read only the adapter's own two files).
    """

    run_dir = Path(run_dir)
    lora, sharded = has_lora(model), is_sharded(model)
    out = TrainedWeights()
    # every rank takes part in a gather, or none does: these conditions are the same on every rank
    if sharded and (keep_full or (write and not lora)):
        out.full_state_dict = gather_full_state_dict(model, env) or None
    if write and lora:
        adapter = gather_adapter_state_dict(model, env)
        if env.is_main:
            out.adapter_dir = _save_adapter(model, adapter, run_dir / ADAPTER_DIR, tokenizer)
    elif write and env.is_main:
        plain = unsharded_copy(model, out.full_state_dict) if sharded else _unwrap(model)
        out.model_dir = save_hf_folder(plain, run_dir / MODEL_DIR, tokenizer)
    if not keep_full:
        out.full_state_dict = None
    env.barrier()
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return unwrap(model)


def _save_adapter(model: nn.Module, adapter: dict[str, torch.Tensor], path: Path, tokenizer: Any = None) -> Path:
    # save_adapter takes module names and adds PEFT's prefix itself
    by_module = {k.removeprefix(PREFIX): v for k, v in adapter.items()}
    save_adapter(_unwrap(model), path, state_dict=by_module, overwrite=True, tokenizer=tokenizer)
    return path


def save_hf_folder(model: nn.Module, path: Path, tokenizer: Any = None) -> Path:
    """`save_pretrained` (safetensors; a tied head is stored once) + tokenizer, atomically: a run killed while
    writing leaves a hidden temporary folder (lorafit/atomic.py), never a half-written `path`."""
    path = Path(path)
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def unsharded_copy(sharded: nn.Module, full_state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    """A plain copy of an FSDP2-sharded Hugging Face model: its original class, the same LoRA (if any), the full
    weights from `full_state_dict` (see `gather_full_state_dict`)."""
    from torch.distributed.fsdp import FSDPModule

    if not full_state_dict:
        raise RuntimeError("the model is sharded: its full state dict must be gathered first (rank 0)")
    cls = next(c for c in type(sharded).__mro__ if not issubclass(c, FSDPModule))
    copy = cls(sharded.config)  # real (CPU) init: non-persistent buffers such as rotary tables come out right
    if has_lora(sharded):
        s = get_settings(sharded)
        # the copy is loaded with the trained (residual) base below: a pissa/olora decomposition here would be lost
        init = s.init if s.init in ("kaiming", "gaussian") else "kaiming"
        apply_lora(
            copy,
            s.r,
            s.alpha,
            s.target_layers,
            dropout=s.dropout,
            init=init,
            use_rslora=s.use_rslora,
            use_dora=s.use_dora,
            warn_save_pretrained=False,
        )
    dtype = next(iter(full_state_dict.values())).dtype
    copy.to(dtype)
    missing, unexpected = copy.load_state_dict(full_state_dict, strict=False)
    # a tied weight (lm_head = embed_tokens) may appear under one name only: it is loaded through the other
    params = dict(copy.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in full_state_dict if k in params}
    missing = [k for k in missing if not (k in params and id(params[k]) in loaded)]
    if missing or unexpected:
        raise RuntimeError(f"unsharded copy does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return copy
