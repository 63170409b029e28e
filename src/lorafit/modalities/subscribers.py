"""Modalities' progress_subscriber (rich, dummy) and results_subscriber (wandb, rich, dummy): the progress bar,
W&B through lorafit's tracker (settings.loggers.wandb), the console."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.errors import UserError


class RichProgressConfig(ComponentConfig):
    train_dataloader: Component("data_loader")
    eval_dataloaders: Any = None
    global_num_seen_steps: int | Component("number_conversion")
    global_rank: int = Field(ge=0)
    gradient_acc_steps: int = Field(gt=0)


@dataclass
class Progress:
    bar: bool
    start_step: int = 0


@register_component("progress_subscriber", "rich", RichProgressConfig)
def build_rich_progress(config: RichProgressConfig) -> Progress:
    """A rich progress bar on rank 0."""
    if config.global_num_seen_steps != 0:
        raise UserError(
            "global_num_seen_steps is Modalities' manual resume; lorafit resumes with --resume_from: "
            "it must be 0 here (settings.training.global_num_seen_tokens: 0)",
            field="global_num_seen_steps",
        )
    return Progress(True)


@register_component("progress_subscriber", "dummy", ComponentConfig)
def build_dummy_progress(config: ComponentConfig) -> Progress:
    """No progress bar."""
    return Progress(False)


class WandbSubscriberConfig(ComponentConfig):
    global_rank: int = Field(ge=0)
    project: str
    experiment_id: str
    mode: Literal["ONLINE", "OFFLINE", "DISABLED"]
    directory: Path
    config_file_path: Path


class RichResultsConfig(ComponentConfig):
    num_ranks: int = Field(gt=0)
    global_rank: int = Field(ge=0)


@dataclass
class Results:
    wandb: WandbSubscriberConfig | None = None


@register_component("results_subscriber", "wandb", WandbSubscriberConfig)
def build_wandb_results(config: WandbSubscriberConfig) -> Results:
    """Weights & Biases (mode ONLINE / OFFLINE / DISABLED, files under directory); needs the wandb package."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(
            "results_subscriber/wandb needs the 'wandb' package, which is not installed: pip install "
            "'lorafit[wandb]', or use variant_key: dummy (metrics.jsonl and TensorBoard are written "
            "anyway)",
            field="mode",
        ) from None
    if config.mode == "ONLINE" and not _wandb_logged_in():
        raise UserError(
            "ONLINE needs a W&B login (`wandb login`, or WANDB_API_KEY): use OFFLINE to write the run "
            f"under {config.directory} for a later `wandb sync`, or DISABLED",
            field="mode",
        )
    return Results(config)


def _wandb_logged_in() -> bool:
    import netrc
    import os

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


@register_component("results_subscriber", "rich", RichResultsConfig)
def build_rich_results(config: RichResultsConfig) -> Results:
    """Results printed to the console (lorafit prints every logged step)."""
    return Results(None)


@register_component("results_subscriber", "dummy", ComponentConfig)
def build_dummy_results(config: ComponentConfig) -> Results:
    """No tracker beyond metrics.jsonl and TensorBoard."""
    return Results(None)
