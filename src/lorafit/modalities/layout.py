"""The Modalities layout, registered at the border (config/layouts.py): a config with a top-level
`train_dataloader` is checked and built by lorafit/modalities/run.py into the run description every layout gives
(`BuiltRun`): its sharding (the fsdp block) becomes lorafit's `parallelism` entity when it is checked, and its
run-level decisions are lorafit's on the translated config, with the run folder under checkpoint_path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lorafit.config.graph import ConfigGraph
from lorafit.config.layouts import RunOutline, checked_graph, register_layout
from lorafit.modalities import run
from lorafit.run.build import lorafit_outline


def outline(config: dict[str, Any]) -> RunOutline:
    """lorafit's decisions on the translated config (its sharding, now a `parallelism` entity), and the run folder
    under checkpoint_path, where Modalities keeps the experiment."""
    translated, _ = run.translate(config)
    graph = checked_graph(translated)
    return dataclasses.replace(lorafit_outline(graph), run_root=run.checkpoint_root(config), seed=_sampler_seed(graph))


def _sampler_seed(graph: ConfigGraph) -> int | None:
    """The train data loader's sampler seed, from the checked typed configs: the run's seed (modalities/run.py)."""
    node = graph.entity(graph.checked.get("train_dataloader"))
    for field in ("batch_sampler", "sampler"):
        node = graph.entity(getattr(getattr(node, "config", None), field, None))
    return getattr(getattr(node, "config", None), "seed", None)


class ModalitiesLayout:
    """A Modalities training config (a top-level `train_dataloader`), translated at the border (config/layouts.py)."""

    name = "modalities"

    def recognises(self, config: dict[str, Any]) -> bool:
        return "train_dataloader" in config

    check = staticmethod(run.check)
    outline = staticmethod(outline)
    build = staticmethod(run.build)


register_layout(ModalitiesLayout())
