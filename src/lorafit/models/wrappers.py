"""The Hugging Face model inside what training wraps it in, and names without the wrappers' segments.

Training calls a `CausalLMLoss` (training/loss.py) holding the model, which DDP may wrap and torch.compile may
wrap; FSDP2 does not wrap (it swaps classes in place and turns parameters into DTensors). Everything that needs
the model itself (its parameter names, its adapters, `save_pretrained`) goes through `unwrap`.
"""

from __future__ import annotations

import torch
from torch import nn

# wrapper segments that torch.compile / activation checkpointing / FSDP1 put into parameter names
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """A parameter/module name without wrapper segments, i.e. the name in the plain transformers model."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


class HoldsModel(nn.Module):
    """A module that runs a model held inside it, `causal_lm` (the training step's loss module, training/loss.py):
    what `unwrap` looks through. Declared here, below training/, so that models/ never imports training/."""

    causal_lm: nn.Module


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DDP wrapper, a torch.compile OptimizedModule (FSDP2 does not wrap) or the
    training step's loss module (a `HoldsModel`)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, HoldsModel):
            model = model.causal_lm
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for an FSDP2 / tensor-parallel DTensor (a shard with a global shape)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind `tensor` (a collective for a DTensor: every rank must call it)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor shard (may be empty); any other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor
