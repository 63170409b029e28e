"""Modalities' sharding translated into lorafit's, when a Modalities config is checked (lorafit/modalities/run.py).

Modalities wraps the model in `model/fsdp_wrapped` (the lora branch: FSDP1 settings) or `model/fsdp2_wrapped`
(modalities 0.5.0), as the run's `wrapped_model`, inside app_state's model, or under a `model_initialized`. The
block is replaced by the model it wraps, and what it asked (precision, sharding or not, activation checkpointing)
becomes lorafit's top-level `parallelism` entity: the core reads its sharding as it reads a lorafit config's.
"""

from __future__ import annotations

from typing import Any

from lorafit.config.graph import ConfigGraph, is_reference
from lorafit.modalities.training import FSDP_VARIANTS, parallelism_block


def wrapped_model_block(config: dict[str, Any]) -> dict[str, Any]:
    """The config block of the run's wrapped model (`wrapped_model`, or app_state's `model`), references followed."""

    def follow(node: Any) -> Any:
        while is_reference(node):
            node = config[node["instance_key"]]
        return node

    top = follow(follow(config["app_state"])["config"]["model"] if "app_state" in config else config["wrapped_model"])
    # Modalities 0.5.0 initialises after sharding: model_initialized {model: fsdp2_wrapped {...}}. The precision and
    # sharding live in the fsdp block, however deep, so look through model wrappers down to it.
    node = top
    while isinstance(node, dict) and node.get("variant_key") not in FSDP_VARIANTS:
        inner = (node.get("config") or {}).get("model") if node.get("component_key") == "model" else None
        if inner is None:
            return top
        node = follow(inner)
    return node if isinstance(node, dict) else top


class ModalitiesGraph(ConfigGraph):
    """The graph of a checked, translated Modalities config, with what the translation keeps for the build: the
    fsdp block's block_names and their YAML path (checked against the built model's classes)."""

    def __init__(self, config: dict[str, Any], block_names: tuple[str, list[str]] | None):
        super().__init__(config)
        self.block_names = block_names


def translate(
    config: dict[str, Any], *, activation_checkpointing: bool = False
) -> tuple[dict[str, Any], tuple[str, list[str]] | None]:
    """The config with Modalities' sharding translated into lorafit's: the wrapped model's fsdp_wrapped /
    fsdp2_wrapped block (however deep, `wrapped_model_block`) replaced by the model it wraps, and a top-level
    `parallelism` entity for what it asked (`parallelism_block`); with the block's (path, block_names). A config
    that has its `parallelism` already is returned as it is."""
    if "parallelism" in config:
        return config, None
    block = wrapped_model_block(config)
    parallelism = parallelism_block(block, activation_checkpointing=activation_checkpointing)
    if block.get("variant_key") not in FSDP_VARIANTS:
        return {**config, "parallelism": parallelism}, None
    path = next(p for p, node in _nodes(config) if node is block)
    names = list((block.get("config") or {}).get("block_names") or [])
    return {**_replaced(config, block, block["config"]["model"]), "parallelism": parallelism}, (path, names)


def _nodes(value: Any, path: str = "") -> Any:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _nodes(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _nodes(item, f"{path}[{i}]")


def _replaced(value: Any, old: Any, new: Any) -> Any:
    if value is old:
        return new
    if isinstance(value, dict):
        return {k: _replaced(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replaced(v, old, new) for v in value]
    return value
