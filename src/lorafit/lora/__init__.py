"""LoRA: layers, injection into a model, merge/unmerge, adapters in PEFT's format, the `model/lora` component."""

from lorafit.lora import component  # noqa: F401  (registers model/lora)
from lorafit.lora.adapter import adapter_config, adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from lorafit.lora.conv import LoraConv1d, LoraConv2d, LoraConv3d
from lorafit.lora.describe import LoraRow, describe_lora, lora_rows
from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.layers import LoraConv1D, LoraLayer, LoraLinear
from lorafit.lora.merging import merge_and_unload, merge_lora, unmerge_lora
from lorafit.lora.model import (
    LoraSettings,
    apply_lora,
    count_parameters,
    get_settings,
    has_lora,
    lora_layers,
    lora_parameters,
    mark_only_lora_trainable,
    named_lora_parameters,
    remove_lora,
    reset_lora_parameters,
    trainable_summary,
)
from lorafit.lora.saving import save_pretrained

__all__ = [
    "LoraConv1D",
    "LoraConv1d",
    "LoraConv2d",
    "LoraConv3d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraRow",
    "LoraSettings",
    "adapter_config",
    "adapter_state_dict",
    "apply_lora",
    "count_parameters",
    "describe_lora",
    "get_settings",
    "has_lora",
    "load_adapter",
    "lora_layers",
    "lora_parameters",
    "lora_rows",
    "mark_only_lora_trainable",
    "merge_and_unload",
    "merge_lora",
    "named_lora_parameters",
    "read_adapter_config",
    "remove_lora",
    "reset_lora_parameters",
    "save_adapter",
    "save_pretrained",
    "trainable_summary",
    "unmerge_lora",
]
