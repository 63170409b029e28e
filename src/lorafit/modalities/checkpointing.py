"""Modalities' checkpoint_saving/default with its strategy and execution: checkpoints under
checkpoint_path/<experiment_id>/ (lorafit's run folder is that folder), keeping the k most recent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.errors import UserError


class KMostRecentConfig(ComponentConfig):
    k: int = Field(ge=-1)


class EveryKStepsConfig(ComponentConfig):
    k: int = Field(gt=0)


@dataclass
class KeepStrategy:
    keep: int | None  # None: keep all
    every: int | None = None  # save_every_k_steps: keep those at multiples of k (lorafit: keeps all)


@register_component("checkpoint_saving_strategy", "save_k_most_recent_checkpoints_strategy", KMostRecentConfig)
def build_k_most_recent(config: KMostRecentConfig) -> KeepStrategy:
    """Keep the k most recent checkpoints (-1: all)."""
    if config.k == 0:
        raise UserError(
            "k: 0 keeps no checkpoint; lorafit always keeps the last one (to resume): use k >= 1 or -1", field="k"
        )
    return KeepStrategy(None if config.k == -1 else config.k)


@register_component("checkpoint_saving_strategy", "save_every_k_steps_checkpointing_strategy", EveryKStepsConfig)
def build_every_k(config: EveryKStepsConfig) -> KeepStrategy:
    """Keep every checkpoint (written every checkpointing_interval_in_steps steps)."""
    return KeepStrategy(None, config.k)


class FSDPExecutionConfig(ComponentConfig):
    checkpoint_path: Path
    global_rank: int = Field(ge=0)
    experiment_id: str
    get_num_tokens_from_num_steps_callable: Any = None

    @field_validator("checkpoint_path")
    @classmethod
    def _a_folder(cls, path: Path) -> Path:
        """The run folders go under it: a file there (or above it) is refused when the config is checked."""
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ValueError(f"{blocking} is a file, not a folder; the run folders go under checkpoint_path")
        return path


@dataclass
class CheckpointExecution:
    checkpoint_path: Path
    experiment_id: str


@register_component("checkpoint_saving_execution", "fsdp", FSDPExecutionConfig)
def build_fsdp_execution(config: FSDPExecutionConfig) -> CheckpointExecution:
    """Checkpoints under checkpoint_path/<experiment_id>/ (lorafit's run folder is that folder)."""
    return CheckpointExecution(config.checkpoint_path, config.experiment_id)


class CheckpointSavingConfig(ComponentConfig):
    checkpoint_saving_strategy: Component("checkpoint_saving_strategy")
    checkpoint_saving_execution: Component("checkpoint_saving_execution")


@dataclass
class CheckpointSaving:
    strategy: KeepStrategy
    execution: CheckpointExecution


@register_component("checkpoint_saving", "default", CheckpointSavingConfig)
def build_checkpoint_saving(config: CheckpointSavingConfig) -> CheckpointSaving:
    """Where checkpoints go and how many stay."""
    return CheckpointSaving(config.checkpoint_saving_strategy, config.checkpoint_saving_execution)
