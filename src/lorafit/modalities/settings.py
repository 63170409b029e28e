"""The `settings` block of a Modalities training config, in both of Modalities' layouts: the `lora` branch's
`settings.training.*` and modalities 0.5.0's `step_profile` / `training_target` / `intervals` /
`consistency_enforcement` / `training_progress`. Checked strictly: an unknown key is an error."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
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
