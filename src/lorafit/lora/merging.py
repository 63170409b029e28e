"""Explicit merge / unmerge / merge-and-unload. Nothing merges implicitly (not in train(), not in eval()).

Run these on an unsharded model (after gathering a full state dict, or on one process): merging into FSDP
shards is the corruption Modalities' eval-time merge caused. A merged model must not be saved as a base
checkpoint of a LoRA model (the delta would be applied twice on reload): export with `merge_and_unload`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from lorafit.errors import UserError
from lorafit.frozen.linear import has_low_precision_frozen, store_frozen_linears
from lorafit.frozen.nf4 import dequantize_nf4_linears
from lorafit.lora.layers import LoraLayer
from lorafit.lora.model import _replace, lora_layers
from lorafit.models.wrappers import canonical_name, is_dtensor, unwrap


def _shared_weights(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> list[str]:
    """Messages for LoRA base weights that other modules also use (tied embeddings): merging would change those."""
    owners: dict[int, list[str]] = defaultdict(list)
    for module_name, module in model.named_modules():
        for param_name, param in module._parameters.items():
            if param is not None:
                owners[id(param)].append(f"{module_name}.{param_name}" if module_name else param_name)
    found = []
    for name, layer in layers:
        users = owners[id(layer.weight)]
        if len(users) > 1:
            others = ", ".join(canonical_name(u) for u in users if u != f"{name}.weight")
            found.append(f"{canonical_name(name)}.weight is tied to {others}")
    return found


def merge_lora(model: nn.Module) -> None:
    """Add every adapter into its base weight (delta computed in fp32, rounded once to the weight's dtype).

    Refuses, before changing anything, when a merged weight would be non-finite, when a weight is on the
    meta device, or when a LoRA weight is tied to another module (merging would change that module too).
    """
    model = unwrap(model)
    layers = [(name, layer) for name, layer in lora_layers(model) if not layer.merged]
    if not layers:
        return
    if any(layer.weight.device.type == "meta" for _, layer in layers):
        raise UserError("cannot merge LoRA into a model on the meta device: load its weights first")
    if any(is_dtensor(layer.weight) for _, layer in layers):
        # merging into shards is how Modalities corrupted evaluation; merge a gathered, unsharded copy instead
        raise UserError("cannot merge LoRA into a sharded (FSDP) model: gather a full state dict and merge that")

    # a 4-bit base (frozen_dtype nf4) is dequantised: the merged weight is the NF4-rounded base plus the adapter, fp32
    dequantize_nf4_linears(model)
    tied = _shared_weights(model, layers)
    if tied:
        raise UserError(
            "cannot merge LoRA into a tied weight, it would change the other module too: "
            + "; ".join(tied)
            + ". Keep the adapter separate, or train with untied embeddings (tie_word_embeddings: false)"
        )
    broken = []
    for name, layer in layers:
        weight = layer.weight
        merged = (weight.float() + layer.delta_weight()).to(weight.dtype)
        if not torch.isfinite(merged).all():
            broken.append(canonical_name(name))
    if broken:
        raise UserError(f"refusing to merge: the adapter makes non-finite weights in {', '.join(broken)}")
    for _, layer in layers:
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtract every merged adapter again."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base modules back (same Parameters): a plain transformers model, no LoRA left.

    Frozen weights stored in a lower precision than the adapters (`frozen_dtype`: NF4 or bf16) become fp32 first:
    plain modules compute in their weight's dtype, so the result holds one dtype, the base as trained (rounded as
    it was stored) plus the adapter.
    """

    model = unwrap(model)
    if has_low_precision_frozen(model):
        dequantize_nf4_linears(model)
        store_frozen_linears(model, torch.float32)
    merge_lora(model)
    for name, layer in lora_layers(model):
        _replace(model, name, layer.to_base())
    model.__dict__.pop("lora_config", None)
    return model
