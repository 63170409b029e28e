"""The Modalities layout, registered at the border (config/layouts.py): a config with a top-level
`train_dataloader` is checked and built by lorafit/modalities/run.py into the run description every layout gives
(`BuiltRun`), and its run-level decisions (sharding from the wrapped model, the run folder under checkpoint_path)
are taken here, from its own blocks, before anything is built.
"""

from __future__ import annotations

from typing import Any

from lorafit.config.layouts import (
    RunOutline,
    adapters_from_checkpoint,
    components_of,
    has_weights_file,
    needs_whole_weights,
    register_layout,
)
from lorafit.distributed.parallel import DDPStrategy
from lorafit.modalities import run
from lorafit.modalities.training import parallelism_of


def outline(config: dict[str, Any]) -> RunOutline:
    """The run-level decisions: the wrapped model's sharding, and the run folder under checkpoint_path."""

    components = list(components_of(config))
    ddp = isinstance(parallelism_of(run.wrapped_model_block(config)), DDPStrategy)
    return RunOutline(
        parallelism="ddp" if ddp else "fsdp2",
        weights_file=has_weights_file(components),
        needs_whole_weights=needs_whole_weights(components),
        adapters_from_checkpoint=adapters_from_checkpoint(config),
        run_root=run.checkpoint_root(config),
    )


class ModalitiesLayout:
    """A Modalities training config (a top-level `train_dataloader`), translated at the border (config/layouts.py)."""

    name = "modalities"

    def recognises(self, config: dict[str, Any]) -> bool:
        return "train_dataloader" in config

    check = staticmethod(run.check)
    outline = staticmethod(outline)
    build = staticmethod(run.build)


register_layout(ModalitiesLayout())
