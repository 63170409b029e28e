"""Modalities' progress_subscriber (rich, dummy) and results_subscriber (wandb, rich, dummy): the progress bar,
W&B through lorafit's tracker (settings.loggers.wandb), the console."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.errors import UserError


class RichProgressConfig(ComponentConfig):
    """Both of Modalities' layouts: the lora branch's (train_dataloader, global_num_seen_steps, gradient_acc_steps)
    and the lora_2 branch's / 0.5.0's (train_dataloader_tag, num_seen_steps, num_target_steps)."""

    global_rank: int = Field(ge=0)
    eval_dataloaders: Any = None
    train_dataloader: Component("data_loader") | None = None
    global_num_seen_steps: int | Component("number_conversion") | None = None
    gradient_acc_steps: int | None = Field(None, gt=0)
    train_dataloader_tag: str | None = None
    num_seen_steps: int | None = Field(None, ge=0)
    num_target_steps: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_layout(self) -> RichProgressConfig:
        old = {
            "train_dataloader": self.train_dataloader,
            "global_num_seen_steps": self.global_num_seen_steps,
            "gradient_acc_steps": self.gradient_acc_steps,
        }
        new = {
            "train_dataloader_tag": self.train_dataloader_tag,
            "num_seen_steps": self.num_seen_steps,
            "num_target_steps": self.num_target_steps,
        }
        for given, other in ((old, new), (new, old)):
            if any(v is not None for v in given.values()):
                missing = [k for k, v in given.items() if v is None]
                mixed = [k for k, v in other.items() if v is not None]
                if missing or mixed:
                    raise ValueError(
                        f"give {', '.join(given)} (one of Modalities' layouts); missing: {missing}, "
                        f"of the other layout: {mixed}"
                    )
                return self
        raise ValueError(f"give {', '.join(old)} (lora branch) or {', '.join(new)} (lora_2 branch, 0.5.0)")


@dataclass
class Progress:
    bar: bool
    start_step: int = 0


@register_component("progress_subscriber", "rich", RichProgressConfig)
def build_rich_progress(config: RichProgressConfig) -> Progress:
    """A rich progress bar on rank 0; it counts the run's steps (num_target_steps, eval_dataloaders: no effect)."""
    seen, key = (
        (config.global_num_seen_steps, "global_num_seen_steps")
        if config.num_seen_steps is None
        else (config.num_seen_steps, "num_seen_steps")
    )
    if seen != 0:
        raise UserError(
            f"{key} is Modalities' manual resume; lorafit resumes with --resume_from: it must be 0 here",
            field=key,
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
