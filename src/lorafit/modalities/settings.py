"""The `settings` block of a Modalities training config, in both of Modalities' layouts: the `lora` branch's
`settings.training.*` and modalities 0.5.0's `step_profile` / `training_target` / `intervals` /
`consistency_enforcement` / `training_progress`. Checked strictly: an unknown key is an error."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafit.config.graph import pydantic_problems
from lorafit.config.run_spec import Intervals
from lorafit.config.strict_values import StrictValues
from lorafit.errors import Problem

log = logging.getLogger(__name__)


class _Strict(StrictValues):
    model_config = ConfigDict(extra="forbid")


class CudaEnv(_Strict):
    local_rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    global_rank: int = Field(ge=0)


class Paths(BaseModel):
    model_config = ConfigDict(extra="allow")  # other paths are there to be interpolated elsewhere

    checkpointing_path: Path | None = None
    experiments_root_path: Path | None = None


class OldTraining(_Strict):
    training_log_interval_in_steps: int = Field(ge=1)
    checkpointing_interval_in_steps: int = Field(ge=1)
    evaluation_interval_in_steps: int = Field(ge=1)
    global_num_seen_tokens: int = Field(0, ge=0)
    activation_checkpointing_modules: list[str] = []
    gradient_acc_steps: int = Field(ge=1)
    local_train_micro_batch_size: int = Field(ge=1)
    sequence_length: int = Field(ge=1)


class NewStepProfile(_Strict):
    gradient_accumulation_steps: int = Field(ge=1)
    local_train_micro_batch_size: int = Field(ge=1)
    sequence_length: int = Field(ge=1)


class NewTarget(_Strict):
    num_target_tokens: int = Field(ge=1)
    num_target_steps: int = Field(ge=1)


class NewProgress(_Strict):
    global_num_seen_tokens: int = Field(0, ge=0)
    num_seen_steps: int = Field(0, ge=0)
    num_seen_samples: int = Field(0, ge=0)
    last_step: int = Field(-1, ge=-1)


class Consistency(_Strict):
    enforce_tokens_per_step_consistency: bool = True
    enforce_last_step_logged: bool = True
    enforce_last_step_evaluated: bool = True
    enforce_last_step_checkpointed: bool = True


class ModalitiesSettings(_Strict):
    experiment_id: str
    config_file_path: str | None = None
    referencing_keys: dict[str, str] = {}
    cuda_env: CudaEnv
    paths: Paths
    training: OldTraining | None = None
    intervals: dict[str, int] | None = None
    step_profile: NewStepProfile | None = None
    training_target: NewTarget | None = None
    training_progress: NewProgress | None = None
    consistency_enforcement: Consistency | None = None


def settings_problems(s: ModalitiesSettings) -> list[Problem]:
    if (s.training is None) == (s.step_profile is None):
        return [
            Problem(
                "settings",
                "give settings.training (Modalities' lora branch) or settings.step_profile + "
                "intervals + training_target (modalities 0.5.0), not both",
            )
        ]
    if s.training is not None:
        extra = [
            k
            for k in ("intervals", "training_target", "training_progress", "consistency_enforcement")
            if getattr(s, k) is not None
        ]
        return [Problem(f"settings.{k}", "belongs to the other settings layout than settings.training") for k in extra]
    problems = [
        Problem(f"settings.{k}", "missing required key")
        for k in ("intervals", "training_target")
        if getattr(s, k) is None
    ]
    if problems:
        return problems
    try:
        Intervals.model_validate(s.intervals)
    except ValidationError as e:
        return pydantic_problems(e, "settings.intervals", Intervals)
    return _consistency(s)


FRESH = {"global_num_seen_tokens": 0, "num_seen_steps": 0, "num_seen_samples": 0, "last_step": -1}


def _consistency(s: ModalitiesSettings) -> list[Problem]:
    """modalities 0.5.0's checks of the new layout: each an error when its enforce_* flag is true, else a warning
    (as Modalities' warn_rank_0). A training_progress other than a fresh start is Modalities' warm start."""
    enforce = s.consistency_enforcement or Consistency()
    progress = s.training_progress or NewProgress()
    sp, target = s.step_profile, s.training_target
    remaining = target.num_target_steps - progress.num_seen_steps
    problems = [
        Problem(
            f"settings.training_progress.{key}",
            f"{getattr(progress, key)}: Modalities' warm start; lorafit resumes with --resume_from, "
            f"so a run starts fresh: valid: {fresh}",
        )
        for key, fresh in FRESH.items()
        if getattr(progress, key) != fresh
    ]
    checks = []
    per_step = sp.local_train_micro_batch_size * sp.sequence_length * sp.gradient_accumulation_steps
    per_step *= s.cuda_env.world_size
    required = (target.num_target_tokens - progress.global_num_seen_tokens) / max(remaining, 1)
    if required != per_step:
        checks.append(
            (
                "tokens_per_step_consistency",
                "settings.training_target",
                f"{required:g} tokens per step are required, the step profile gives {per_step}",
            )
        )
    for name, key in (
        ("logged", "training_log_interval_in_steps"),
        ("evaluated", "evaluation_interval_in_steps"),
        ("checkpointed", "checkpointing_interval_in_steps"),
    ):
        if remaining % s.intervals[key]:
            checks.append(
                (
                    f"last_step_{name}",
                    f"settings.intervals.{key}",
                    f"the last step will not be {name}: {remaining} remaining steps are not a multiple of "
                    f"{s.intervals[key]}",
                )
            )
    for flag, path, message in checks:
        if getattr(enforce, f"enforce_{flag}"):
            problems.append(Problem(path, f"{message} (enforce_{flag})"))
        else:
            log.warning("%s: %s (enforce_%s is false)", path, message, flag)
    return problems
