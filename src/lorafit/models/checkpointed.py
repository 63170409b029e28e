"""`model/checkpointed` and `checkpoint_loading/torch`: a model with its weights from a state-dict file.

    checkpointed_model:
      component_key: model
      variant_key: checkpointed
      config:
        checkpoint_loading:
          {component_key: checkpoint_loading, variant_key: torch, config: {device: 0, precision: FP_32}}
        model: {instance_key: huggingface_smol_llm_model, pass_type: BY_REFERENCE}
        checkpoint_path: data/models/SmolLM2-135M_saved/model.bin    # or .pt, .safetensors, a model folder

`device`: `auto` (this process's GPU if there is one, else the CPU), `cpu`, `cuda`, or an int. Under torchrun an
int means this rank's local GPU (LOCAL_RANK); without CUDA an int falls back to the CPU with one warning, so a
config written for a GPU box still runs on a laptop. `precision`: FP_32 | BF_16 | FP_16 (also fp32, BF16, ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import field_validator
from torch import nn

from lorafit.components import load_builtin_translators
from lorafit.config.context import current_context
from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.console import info, warn
from lorafit.errors import UserError
from lorafit.models.dtypes import dtype_name, to_dtype
from lorafit.models.shard_loading import defer_weights, file_tensors, is_meta
from lorafit.models.weights import load_into, load_state_dict_file, resolve_weights_path

DEVICE_WORDS = ("auto", "cpu", "cuda")
_warned_no_cuda = False


class TorchCheckpointLoadingConfig(ComponentConfig):
    """Where (device) and in which precision a checkpoint is loaded."""

    device: int | str = "auto"
    precision: str = "FP_32"

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> int | str:
        if isinstance(value, str) and value.strip().isdigit():  # `${cuda_env:LOCAL_RANK}` may arrive as text
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected a GPU index or one of {', '.join(DEVICE_WORDS)}, got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"a GPU index is >= 0, got {value}")
            return value
        if value.strip().lower() not in DEVICE_WORDS:
            raise ValueError(f"unknown device {value!r}; valid: a GPU index (0, 1, ...) or {', '.join(DEVICE_WORDS)}")
        return value.strip().lower()

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> str:
        return dtype_name(value)


@dataclass(frozen=True)
class TorchCheckpointLoader:
    """Loads a state-dict file into a model (strict), then puts it on `device` in `precision`."""

    device: int | str = "auto"
    precision: str = "fp32"

    def resolve_device(self) -> torch.device:
        """The device for this process. Errors are UserErrors about `device`."""
        global _warned_no_cuda
        local_rank = os.environ.get("LOCAL_RANK")
        cuda = torch.cuda.is_available()
        if self.device == "cpu" or (self.device == "auto" and not cuda):
            return torch.device("cpu")
        if not cuda:
            if self.device == "cuda":
                raise UserError("device 'cuda', but this machine has no CUDA device: use auto or cpu", field="device")
            if not _warned_no_cuda:
                warn(f"checkpoint_loading device {self.device}: no CUDA device on this machine, loading on the CPU")
                _warned_no_cuda = True
            return torch.device("cpu")
        # under torchrun every rank loads onto its own GPU, whatever index the config names
        index = int(local_rank) if local_rank is not None else (self.device if isinstance(self.device, int) else 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"GPU {index} does not exist: this machine has {torch.cuda.device_count()}", field="device")
        return torch.device("cuda", index)

    def defer(self, model: nn.Module, path: str | Path) -> nn.Module:
        """`model` (on the meta device) cast to `precision`, with `path` recorded as its weights, read after
        sharding (lorafit/models/shard_loading.py); keys and shapes checked now, Modalities' names mapped."""

        tensors = _with_model_names(model, file_tensors(path), path)
        return defer_weights(model.to(dtype=to_dtype(self.precision)), tensors, source=str(path))

    def load(self, model: nn.Module, path: str | Path) -> nn.Module:
        """Load `path` into `model` (keys and shapes checked), then move it to the device and cast it."""
        device = self.resolve_device()
        state_dict = load_state_dict_file(path)
        state_dict = _with_model_names(model, state_dict, path)
        load_into(model, state_dict, source=str(path))
        del state_dict
        return model.to(device=device, dtype=to_dtype(self.precision))


class KeyMapping(Protocol):
    """Another program's checkpoint names -> the model's (e.g. Modalities' wrapper prefixes and bare LoRA A/B:
    lorafit/modalities/checkpoint_keys.py), in the manner of torchtitan's state_dict_adapter."""

    def map(self, state_dict: dict[str, Any], model_keys: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
        """`state_dict` renamed where a key is not the model's, and one line per mapping applied."""

    def describe_unmapped(self, unexpected: list[str], model_keys: Iterable[str]) -> str:
        """Why keys no mapping covers do not fit ('' when it has nothing to say)."""


KEY_MAPPINGS: list[KeyMapping] = []  # filled by the component table's translators (lorafit/components.py)


def register_key_mapping(mapping: KeyMapping) -> KeyMapping:
    KEY_MAPPINGS.append(mapping)
    return mapping


def _with_model_names(model: nn.Module, state_dict: dict[str, Any], path) -> dict[str, Any]:
    """Other programs' names mapped to the model's (`KEY_MAPPINGS`), said in the log; when keys still do not fit,
    the error says which mapping is missing."""
    load_builtin_translators()  # a loader used outside a config (the Python API, a test) maps names all the same
    expected = model.state_dict().keys()
    for mapping in KEY_MAPPINGS:
        state_dict, notes = mapping.map(state_dict, expected)
        for note in notes:
            info(f"{path}: {note}")
    unexpected = [k for k in state_dict if k not in expected]
    hint = next((h for m in KEY_MAPPINGS if (h := m.describe_unmapped(unexpected, expected))), "")
    if hint:
        raise UserError(f"{path} does not fit the model ({type(model).__name__}){hint}")
    return state_dict


@register_component("checkpoint_loading", "torch", TorchCheckpointLoadingConfig)
def build_torch_checkpoint_loading(config: TorchCheckpointLoadingConfig) -> TorchCheckpointLoader:
    """torch state dicts (.bin/.pt, weights_only) and safetensors, onto a device, in a precision."""
    return TorchCheckpointLoader(device=config.device, precision=config.precision)


class CheckpointedModelConfig(ComponentConfig):
    """A model with its weights loaded from `checkpoint_path` by `checkpoint_loading`."""

    checkpoint_loading: Component("checkpoint_loading")
    model: Component("model")
    checkpoint_path: Path


@register_component("model", "checkpointed", CheckpointedModelConfig)
def build_checkpointed_model(config: CheckpointedModelConfig) -> nn.Module:
    """The model with the checkpoint's weights (under validate: the file must exist, nothing is loaded; a model
    built on the meta device for fsdp2 gets the file recorded, and reads its shards of it after sharding)."""
    model, loader = config.model, config.checkpoint_loading
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch model, got {type(model).__name__}", field="model")
    resolve_weights_path(config.checkpoint_path, field="checkpoint_path")
    if not current_context().load_weights:
        return model
    try:
        loader.resolve_device()
    except UserError as e:
        raise e.prefixed("checkpoint_loading.config") from None
    try:
        if is_meta(model):  # fsdp2 under torchrun (lorafit/run/build.py): each rank reads its shards after sharding
            return loader.defer(model, config.checkpoint_path)
        return loader.load(model, config.checkpoint_path)
    except UserError as e:
        raise e.prefixed("checkpoint_path") from None
