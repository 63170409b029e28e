"""What `lorafit run` reads from a config: the `settings` block and a fixed set of top-level entities.

Entities of a run (each a component or a reference to one; everything else at the top level is a named
component that these may reference, as in the seed's `checkpointed_model` / `lora_model`):

| key             | component_key | required | default                                        |
|-----------------|---------------|----------|------------------------------------------------|
| model           | model         | yes      |                                                |
| train_dataset   | dataset       | yes      |                                                |
| tokenizer       | tokenizer     | no       | none (needed by evaluators and merged export)  |
| eval_datasets   | dataset       | no       | {} (a mapping name -> dataset)                 |
| optimizer       | optimizer     | no       | optimizer/adamw (lr 1e-4, no weight decay)     |
| scheduler       | scheduler     | no       | scheduler/constant                             |
| parallelism     | parallelism   | no       | parallelism/fsdp2 under torchrun, else none    |
| evaluators      | evaluator     | no       | [] (run before and after training)             |
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorafit.config.registry import Component
from lorafit.config.strict_values import StrictValues
from lorafit.training.trackers import LoggersConfig

RUN_ENTITIES = (
    "model",
    "train_dataset",
    "tokenizer",
    "eval_datasets",
    "optimizer",
    "scheduler",
    "parallelism",
    "evaluators",
)
DEFAULT_COMPONENTS = {
    "optimizer": ("optimizer", "adamw"),
    "scheduler": ("scheduler", "constant"),
}


class _Strict(StrictValues):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StepProfile(_Strict):
    """Tokens per optimizer step = micro_batch_size x gradient_accumulation_steps x world_size x sequence_length."""

    local_train_micro_batch_size: int = Field(4, ge=1, alias="micro_batch_size")
    gradient_accumulation_steps: int = Field(1, ge=1)
    sequence_length: int = Field(256, ge=2)


class TrainingTarget(_Strict):
    num_target_steps: int | None = Field(None, ge=1)
    num_target_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_target(self) -> TrainingTarget:
        if self.num_target_steps is None and self.num_target_tokens is None:
            raise ValueError("set num_target_steps or num_target_tokens")
        return self


class Intervals(_Strict):
    training_log_interval_in_steps: int = Field(1, ge=1)
    checkpointing_interval_in_steps: int | None = Field(None, ge=1)  # None: only at the end
    evaluation_interval_in_steps: int | None = Field(None, ge=1)  # None: only at the end


class Checkpointing(_Strict):
    keep_last: int = Field(2, ge=1)


class Export(_Strict):
    merged_model: bool = False  # also write a merged Hugging Face folder into the run folder
    # written into adapter/adapter_config.json for PEFT's AutoPeftModel (default: the base folder's absolute path)
    base_model_name_or_path: str | None = None


class RunSettings(BaseModel):
    """The `settings` block. Unknown keys are allowed here (Modalities keeps paths, cuda_env, referencing_keys ...
    in it and interpolates them elsewhere); the blocks below are checked strictly."""

    model_config = ConfigDict(extra="allow")

    seed: int = 42
    step_profile: StepProfile = StepProfile()
    training_target: TrainingTarget = TrainingTarget(num_target_steps=100)
    intervals: Intervals = Intervals()
    checkpointing: Checkpointing = Checkpointing()
    gradient_clipping: float | None = Field(1.0, gt=0)
    eval_max_batches: int | None = Field(None, ge=1)
    export: Export = Export()
    # the allocator `lorafit run` ran under (lorafit/allocator.py). Read from the YAML by the `lorafit` program
    # before it starts (after --allocator and LORAFIT_MALLOC); written into config.resolved.yaml by every run
    allocator: Literal["tbbmalloc", "system", "jemalloc", "tcmalloc"] | None = None
    loggers: LoggersConfig = LoggersConfig()  # trackers beside metrics.jsonl (lorafit/training/trackers.py)


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    settings: RunSettings = RunSettings()
    model: Component("model")
    train_dataset: Component("dataset")
    tokenizer: Component("tokenizer") | None = None
    eval_datasets: dict[str, Component("dataset")] = {}
    optimizer: Component("optimizer") | None = None
    scheduler: Component("scheduler") | None = None
    parallelism: Component("parallelism") | None = None
    evaluators: list[Component("evaluator")] = []


def num_steps(settings: RunSettings, world_size: int) -> int:
    target = settings.training_target
    if target.num_target_steps is not None:
        return target.num_target_steps
    sp = settings.step_profile
    tokens_per_step = sp.local_train_micro_batch_size * sp.gradient_accumulation_steps * world_size * sp.sequence_length
    return max(1, target.num_target_tokens // tokens_per_step)


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    settings = config.get("settings", {})
    return settings if isinstance(settings, dict) else {}
