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

from lorafit.config.loggers import LoggersConfig
from lorafit.config.registry import Component
from lorafit.config.strict_values import StrictValues
from lorafit.errors import UserError

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
    """How long to train: steps, tokens (steps = tokens // tokens per step), or epochs over the training samples
    (steps = floor(epochs x samples // global batch); a sample is what the dataset yields: a packed block of
    conversations or text, or one conversation without packing; see `num_steps`)."""

    num_target_steps: int | None = Field(None, ge=1)
    num_target_tokens: int | None = Field(None, ge=1)
    num_target_epochs: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_target(self) -> TrainingTarget:
        if self.num_target_steps is None and self.num_target_tokens is None and self.num_target_epochs is None:
            raise ValueError("set num_target_steps, num_target_tokens or num_target_epochs")
        if self.num_target_epochs is not None and (self.num_target_steps or self.num_target_tokens):
            raise ValueError("num_target_epochs goes alone: remove num_target_steps / num_target_tokens")
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
    # accepted because run folders of earlier versions recorded the allocator here; it chooses nothing (--allocator
    # or LORAFIT_MALLOC choose; a value naming another is said in the log; the record is now a comment on top of
    # config.resolved.yaml)
    allocator: Literal["tbbmalloc", "system", "jemalloc", "tcmalloc"] | None = None
    loggers: LoggersConfig = LoggersConfig()  # trackers beside metrics.jsonl (config/loggers.py)


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


def num_steps(settings: RunSettings, world_size: int, num_samples: int | None = None) -> int:
    """Optimizer steps of the run. For an epoch target, `num_samples` is len(train_dataset): an epoch is
    samples // global batch steps (global batch = micro batch x accumulation x processes; the sampler leaves the
    tail that does not fill one out of that epoch, a different tail each epoch), the target that times
    `epochs`, rounded down, at least 1."""
    target = settings.training_target
    if target.num_target_steps is not None:
        return target.num_target_steps
    sp = settings.step_profile
    global_batch = sp.local_train_micro_batch_size * sp.gradient_accumulation_steps * world_size
    if target.num_target_epochs is not None:
        if num_samples is None:
            raise ValueError("an epoch target needs the number of training samples")
        per_epoch = num_samples // global_batch
        if per_epoch < 1:
            raise UserError(
                f"num_target_epochs: the training data has {num_samples:,} samples, fewer than one global "
                f"batch of {global_batch} (micro batch {sp.local_train_micro_batch_size} x accumulation "
                f"{sp.gradient_accumulation_steps} x {world_size} processes)",
                field="settings.training_target.num_target_epochs",
            )
        return max(1, int(target.num_target_epochs * per_epoch + 1e-9))  # 2.3 x 10 is 22.999...96 in floats
    return max(1, target.num_target_tokens // (global_batch * sp.sequence_length))


def describe_steps(settings: RunSettings, num_samples: int | None, world_sizes: tuple[int, ...] = (2, 8)) -> str:
    """`lorafit validate`'s account of the step budget: the steps, what one step holds, and with several
    processes; for an epoch target, what an epoch is (`num_samples`: None when the data is not tokenized yet)."""
    sp, target = settings.step_profile, settings.training_target
    micro, accum, seq = sp.local_train_micro_batch_size, sp.gradient_accumulation_steps, sp.sequence_length
    epochs = target.num_target_epochs
    known = epochs is None or (num_samples is not None and num_samples >= micro * accum)
    steps = f"{num_steps(settings, 1, num_samples):,}" if known else "counted from the data at the start of the run"
    lines = [
        f"steps: {steps} (one process); tokens per step per process: {micro * accum * seq} = micro batch "
        f"{micro} x accumulation {accum} x sequence {seq} (global batch: micro batch x accumulation x "
        "processes)"
    ]
    if target.num_target_steps is not None:
        return lines[0]
    if epochs is None:
        more = ", ".join(f"{w} processes: {num_steps(settings, w):,}" for w in world_sizes)
        lines.append(
            f"  num_target_tokens {target.num_target_tokens:,}: steps = tokens // (tokens per step per "
            f"process x processes); {more}"
        )
        return "\n".join(lines)
    lines.append(
        f"  num_target_epochs {epochs:g}: an epoch shows every training sample once (a sample: a packed "
        "block of conversations or text, or one conversation without packing); steps = floor(epochs x "
        "(samples // global batch)); samples that do not fill a last global batch are left out of that "
        "epoch (a different tail each epoch)"
    )
    if num_samples is None:
        lines.append(
            "  the data is not tokenized yet, so the samples are not counted (`lorafit data preview "
            "--config ...` tokenizes it and shows them)"
        )
        return "\n".join(lines)
    counts = [
        f"{w} process{'es' if w > 1 else ''}: {num_samples // (micro * accum * w):,} steps per epoch, "
        f"{num_steps(settings, w, num_samples):,} in all"
        for w in (1, *world_sizes)
        if num_samples >= micro * accum * w
    ]
    lines.append(f"  {num_samples:,} training samples (the tokenized cache as it is now): {'; '.join(counts)}")
    return "\n".join(lines)


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    settings = config.get("settings", {})
    return settings if isinstance(settings, dict) else {}
