"""Hugging Face causal LMs as components.

    hf_model:                                  # weights from a local folder (or the hub, when reachable)
      component_key: model
      variant_key: huggingface_pretrained_model
      config: {model_name_or_path: data/models/SmolLM2-135M, dtype: fp32, attn_implementation: sdpa}

    huggingface_smol_llm_model:                # the architecture only: weights come from a `model/checkpointed`
      component_key: model
      variant_key: huggingface_from_config
      config: {config_path: data/models/SmolLM2-135M}    # a folder with config.json, or the json file
      # or inline: {model_type: llama, config_overrides: {hidden_size: 64, num_hidden_layers: 2, ...}}

Under `lorafit validate` (`current_context().meta_device`) both build on the meta device and read no weights; under
`lorafit run` with fsdp2 on several processes the pretrained model is built on meta too, and each rank reads its
shards of the folder's safetensors after sharding (lorafit/models/shard_loading.py).
Otherwise `huggingface_from_config` allocates the weights without computing a random init; the init runs later
unless a checkpoint is loaded first (see `lorafit.models.deferred`), so a checkpointed model is not initialised twice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from lorafit.config.context import current_context
from lorafit.config.registry import ComponentConfig, register_component
from lorafit.console import info
from lorafit.errors import UserError, did_you_mean
from lorafit.models.deferred import defer_or_initialize
from lorafit.models.dtypes import dtype_name, to_dtype
from lorafit.models.shard_loading import defer_weights, file_tensors

__all__ = [
    "build_from_config",
    "build_pretrained_model",
    "load_hf_config",
    "load_pretrained_model",
    "model_from_config",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class _ModelOptions(ComponentConfig):
    dtype: str = "fp32"
    attn_implementation: str = "sdpa"

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> str:
        return dtype_name(value)


class PretrainedModelConfig(_ModelOptions):
    """A causal LM with its weights from a local Hugging Face folder (config.json + safetensors or bin).

    Modalities' spelling works too: `model_name` (for model_name_or_path), `model_type: AutoModelForCausalLM`,
    `kwargs` (passed to from_pretrained); `prediction_key`, `huggingface_prediction_subscription_key` and
    `sample_key` name Modalities' batch dictionary keys and have no effect here (lorafit's loss reads the logits).
    """

    model_name_or_path: str | None = None
    model_name: str | None = None
    model_type: Literal["AutoModelForCausalLM"] | None = None
    prediction_key: str | None = None
    huggingface_prediction_subscription_key: str | None = None
    sample_key: str | None = None
    model_args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_name(self) -> PretrainedModelConfig:
        if (self.model_name_or_path is None) == (self.model_name is None):
            raise ValueError("give exactly one of model_name_or_path and model_name (Modalities' spelling)")
        if self.model_args:
            raise ValueError("model_args (positional from_pretrained arguments) are not supported: use kwargs")
        return self


class FromConfigModelConfig(_ModelOptions):
    """A causal LM from its config alone: `config_path` (folder or config.json), or `model_type` + overrides."""

    config_path: Path | None = None
    model_type: str | None = None
    config_overrides: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_source(self) -> FromConfigModelConfig:
        if (self.config_path is None) == (self.model_type is None):
            raise ValueError("give exactly one of config_path (a folder with config.json, or the file) and model_type")
        return self


# ------------------------------------------------------------------------------------------------ pretrained
@register_component("model", "huggingface_pretrained_model", PretrainedModelConfig)
def build_pretrained_model(config: PretrainedModelConfig) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained on a local folder (meta device, no weights, under validate)."""
    field = "model_name_or_path" if config.model_name_or_path is not None else "model_name"
    return load_pretrained_model(
        config.model_name_or_path or config.model_name,
        dtype=config.dtype,
        attn_implementation=config.attn_implementation,
        field=field,
        kwargs=config.kwargs or {},
    )


def load_pretrained_model(
    name_or_path: str | Path,
    *,
    dtype: str = "fp32",
    attn_implementation: str = "sdpa",
    field: str = "model_name_or_path",
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The model in a local Hugging Face folder (or a hub id, when the hub is reachable), in `dtype`."""
    source = _model_source(str(name_or_path), field)
    context = current_context()
    if context.meta_device:
        model = model_from_config(_auto_config(source, field), dtype=dtype, attn_implementation=attn_implementation)
        if not context.load_weights:  # lorafit validate
            return model
        deferred = _defer_folder_weights(model, source, field, kwargs)
        if deferred is not None:
            return deferred
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            source,
            dtype=to_dtype(dtype),
            attn_implementation=attn_implementation,
            local_files_only=Path(source).is_dir(),
            **(kwargs or {}),
        )
    except Exception as e:  # OSError, ValueError, SafetensorError, ...: the folder or a file in it is not usable
        raise _load_error(source, e, field) from None


def _defer_folder_weights(model: nn.Module, source: str, field: str, kwargs: dict[str, Any] | None) -> nn.Module | None:
    """The meta-device `model` with the folder's weights recorded, to be read shard by shard after FSDP2 has
    sharded it (lorafit/models/shard_loading.py); None, said in the log, where only transformers' own loader can
    load the folder: then every rank loads the whole model before sharding, as without fsdp2."""

    reason = None
    if kwargs:
        reason = f"kwargs {sorted(kwargs)} are from_pretrained arguments"
    elif not Path(source).is_dir():
        reason = "the weights come from the Hugging Face hub"
    else:
        try:
            return defer_weights(model, file_tensors(source, field=field), source=source, field=field)
        except UserError as e:  # names or layouts that transformers converts while loading (or a broken file)
            reason = f"its weights do not load by the model's own names ({e.render().splitlines()[0][:200]})"
    info(f"{source}: loading the whole model on every rank before sharding: {reason}")
    return None


def _model_source(name: str, field: str) -> str:
    """`name` as a local folder, or as a hub id when the hub can be reached; else a UserError saying what to pass."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder: it has no config.json", field=field)
        return str(path)
    if path.exists():
        raise UserError(f"{path} is a file; give the model's folder (config.json + weights)", field=field)
    if not _HUB_ID.match(name) or name.startswith((".", "~")) or ("/" not in name and Path(name).suffix):
        raise UserError(f"model folder not found: {path}", field=field)
    from huggingface_hub.constants import is_offline_mode

    if is_offline_mode():
        raise UserError(
            f"'{name}' is not a local folder, and the Hugging Face hub is offline (HF_HUB_OFFLINE=1): pass a local "
            "directory with config.json and the weights (e.g. data/models/SmolLM2-135M from "
            "`lorafit models prepare smollm2-135m`)",
            field=field,
        )
    return name


def _load_error(source: str, error: Exception, field: str) -> UserError:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not Path(source).is_dir():
        return UserError(
            f"cannot load '{source}' from the Hugging Face hub ({text}); without network access pass "
            "a local directory with config.json and the weights",
            field=field,
        )
    return UserError(f"cannot load the model in {source}: {text}", field=field)


def _auto_config(source: str, field: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=Path(source).is_dir())
    except Exception as e:  # a bad config.json, an unknown model_type, an unreachable hub
        raise _load_error(source, e, field) from None


# ------------------------------------------------------------------------------------------------ from config
@register_component("model", "huggingface_from_config", FromConfigModelConfig)
def build_from_config(config: FromConfigModelConfig) -> nn.Module:
    """The architecture from a config.json or inline settings; random weights unless a checkpoint is loaded."""
    hf_config = load_hf_config(config.config_path, config.model_type, config.config_overrides)
    try:
        return model_from_config(hf_config, dtype=config.dtype, attn_implementation=config.attn_implementation)
    except UserError as e:  # not a causal LM: the config the user named is the cause
        if any(p.path for p in e.problems):
            raise
        raise e.prefixed("config_path" if config.config_path is not None else "model_type") from None


def load_hf_config(
    config_path: Path | None = None, model_type: str | None = None, overrides: dict[str, Any] | None = None
):
    """A transformers config from a folder / config.json, or from `model_type`; `overrides` checked by name."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values: dict[str, Any] = {}
    field = "model_type"
    if config_path is not None:
        field = "config_path"
        file = Path(config_path) / "config.json" if Path(config_path).is_dir() else Path(config_path)
        if not file.is_file():
            raise UserError(f"config not found: {file} (give a folder with config.json, or the file)", field=field)
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {file}: {e}", field=field) from None
        if not isinstance(values, dict) or "model_type" not in values:
            raise UserError(f"{file} has no model_type: not a Hugging Face model config", field=field)
        model_type = values["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise UserError(
            f"unknown model_type '{model_type}'{did_you_mean(model_type, list(CONFIG_MAPPING.keys()))}", field=field
        )
    config_class = CONFIG_MAPPING[model_type]
    overrides = dict(overrides or {})
    try:
        config = config_class.from_dict({**values, **overrides})
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid {model_type} config: {e}", field="config_overrides" if overrides else field) from None
    _check_override_names(config, config_class, overrides)
    return config


def _check_override_names(config, config_class, overrides: dict[str, Any]) -> None:
    """Transformers keeps unknown config keys as plain attributes: a typo would be silently ignored."""
    known = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
    stored = set(config.to_dict())  # legacy names (rope_theta) are consumed into newer fields and not stored
    unknown = [k for k in overrides if k in stored and k not in known]
    if unknown:
        key = unknown[0]
        raise UserError(
            f"'{key}' is not a {config_class.__name__} setting{did_you_mean(key, sorted(known))}",
            field=f"config_overrides.{key}",
        )


def model_from_config(hf_config, *, dtype: str = "fp32", attn_implementation: str = "sdpa") -> nn.Module:
    """AutoModelForCausalLM for `hf_config`: on the meta device under validate, else allocated with its init
    deferred (`lorafit.models.deferred`): a checkpoint loaded before the build ends makes the init unnecessary."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    kwargs = {"dtype": to_dtype(dtype), "attn_implementation": attn_implementation}
    try:
        if current_context().meta_device:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(hf_config, **kwargs)
        with no_init_weights():  # parameters are torch.empty: no RNG, untouched pages cost nothing
            model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
    except (ValueError, ImportError) as e:
        field = "attn_implementation" if "attn" in str(e) or "attention" in str(e) else None
        text = str(e).strip().splitlines()[0]
        raise UserError(f"cannot build a causal LM from a {hf_config.model_type} config: {text}", field=field) from None
    model.tie_weights()  # skipped with the init; ties must exist before weights are loaded
    return defer_or_initialize(model)
