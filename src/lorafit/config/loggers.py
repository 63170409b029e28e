"""The typed `settings.loggers` block: which trackers a run writes to besides metrics.jsonl, and their settings.

A part of the run's settings (config/run_spec.py), so it sits with them below training/: the trackers themselves
(lorafit/training/trackers.py) read these objects, the settings never import the trackers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, field_validator

from lorafit.config.strict_values import StrictValues


class _Strict(StrictValues):
    model_config = ConfigDict(extra="forbid")


class WandbConfig(_Strict):
    """Weights & Biases; `directory` defaults to the run folder, `name` to the experiment id."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "lorafit"
    directory: Path | None = None  # None: the run folder
    name: str | None = None  # None: the experiment id
    entity: str | None = None

    @field_validator("mode", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value  # Modalities writes OFFLINE / ONLINE / DISABLED


class MlflowConfig(_Strict):
    """MLflow; `tracking_uri` defaults to an SQLite store, <run folder>/mlflow.db, `run_name` to the experiment id."""

    tracking_uri: str | None = None  # None: sqlite:///<run folder>/mlflow.db
    experiment_name: str = "lorafit"
    run_name: str | None = None  # None: the experiment id


class LoggersConfig(_Strict):
    """Trackers beside metrics.jsonl (always written). tensorboard: null means on, said in the log if not installed."""

    tensorboard: bool | None = None  # None: on when the package is there (it is a dependency), else said so
    wandb: WandbConfig | None = None
    mlflow: MlflowConfig | None = None


__all__ = ["LoggersConfig", "MlflowConfig", "WandbConfig"]
