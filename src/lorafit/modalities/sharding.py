"""Modalities' sharding translated into lorafit's, when a Modalities config is checked (lorafit/modalities/run.py).

Modalities wraps the model in `model/fsdp_wrapped` (the lora branch: FSDP1 settings) or `model/fsdp2_wrapped`
(modalities 0.5.0), as the run's `wrapped_model`, inside app_state's model, or under a `model_initialized`. The
block is replaced by the model it wraps, and what it asked (precision, sharding or not, activation checkpointing)
becomes lorafit's top-level `parallelism` entity: the core reads its sharding as it reads a lorafit config's.
"""

from __future__ import annotations

from typing import Any

from lorafit.config.graph import ConfigGraph
from lorafit.config.layouts import checked_graph
from lorafit.config.registry import Pending
from lorafit.modalities.training import FSDP_VARIANTS, parallelism_block


def wrapped_model_block(graph: ConfigGraph) -> Pending | None:
    """The checked component (its typed config) of the run's wrapped model (`wrapped_model`, or app_state's
    `model`), references followed. Modalities 0.5.0 initialises after sharding (model_initialized {model:
    fsdp2_wrapped {...}}): the precision and sharding live in the fsdp block, however deep, so look through model
    wrappers down to it; without one, the outermost model."""
    app = graph.entity(graph.checked.get("app_state"))
    app_model = getattr(app.config, "model", None) if isinstance(app, Pending) else None
    top = graph.entity(app_model if app_model is not None else graph.checked.get("wrapped_model"))
    if not isinstance(top, Pending):
        return None
    node = top
    while node.variant_key not in FSDP_VARIANTS:
        inner = getattr(node.config, "model", None) if node.component_key == "model" else None
        node = graph.entity(inner)
        if not isinstance(node, Pending):
            return top
    return node


class ModalitiesGraph(ConfigGraph):
    """The graph of a checked, translated Modalities config, with what the translation keeps for the build: the
    fsdp block's block_names and their YAML path (checked against the built model's classes)."""

    def __init__(self, config: dict[str, Any], block_names: tuple[str, list[str]] | None):
        super().__init__(config)
        self.block_names = block_names


def translate(
    config: dict[str, Any], graph: ConfigGraph | None = None, *, activation_checkpointing: bool = False
) -> tuple[dict[str, Any], tuple[str, list[str]] | None]:
    """The config with Modalities' sharding translated into lorafit's: the wrapped model's fsdp_wrapped /
    fsdp2_wrapped block (however deep, `wrapped_model_block`, decided from `graph`'s typed configs: the checked
    graph of `config`, checked now when not given) replaced by the model it wraps, and a top-level `parallelism`
    entity for what it asked (`parallelism_block`); with the block's (path, block_names). A config that has its
    `parallelism` already is returned as it is."""
    if "parallelism" in config:
        return config, None
    block = wrapped_model_block(graph if graph is not None else checked_graph(config))
    parallelism = parallelism_block(block, activation_checkpointing=activation_checkpointing)
    if block is None or block.variant_key not in FSDP_VARIANTS:
        return {**config, "parallelism": parallelism}, None
    raw = next(node for path, node in _nodes(config) if path == block.path)  # the block's YAML, rewritten
    names = list(getattr(block.config, "block_names", None) or [])
    return {**_replaced(config, raw, raw["config"]["model"]), "parallelism": parallelism}, (block.path, names)


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
