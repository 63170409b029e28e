"""Modalities' number_conversion components: steps, batches and tokens from one another, by its formulas.

The `lora` branch's step conversions have no gradient_accumulation_steps; the `lora_2` branch and modalities 0.5.0
divide by it too (default 1 here, so both spellings give Modalities' number). The number of data-parallel ranks is
`num_ranks` in the branches and `dp_degree` in modalities 0.5.0: both are taken."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, Field

from lorafit.config.registry import ComponentConfig, register_component
from lorafit.modalities.data import PackedContinuousDataset


class _Ranks(ComponentConfig):
    # the lora branches' name, and modalities 0.5.0's (the data-parallel degree): either spelling, one number
    num_ranks: int = Field(gt=0, validation_alias=AliasChoices("num_ranks", "dp_degree"))
    local_micro_batch_size: int = Field(gt=0)


class FromSamplesConfig(_Ranks):
    global_num_samples: int = Field(ge=0)


class FromTokensConfig(_Ranks):
    global_num_tokens: int = Field(ge=0)
    sequence_length: int = Field(gt=0)


class StepsFromSamplesConfig(FromSamplesConfig):
    gradient_accumulation_steps: int = Field(1, gt=0)


class StepsFromTokensConfig(FromTokensConfig):
    gradient_accumulation_steps: int = Field(1, gt=0)


class TokensFromNumStepsConfig(_Ranks):
    num_steps: int = Field(ge=0)
    sequence_length: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)


class SamplesFromTokensConfig(ComponentConfig):
    num_tokens: int = Field(ge=0)
    sequence_length: int = Field(gt=0)


class TokensFromDatasetConfig(_Ranks):
    dataset_path: Path
    sequence_length: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    reuse_last_target: bool = True  # modalities 0.5.0's key; the lora_2 branch always reuses it


class TokensFromStepsConfig(_Ranks):
    sequence_length: int = Field(gt=0)


@register_component("number_conversion", "local_num_batches_from_num_samples", FromSamplesConfig)
def local_batches_from_samples(c: FromSamplesConfig) -> int:
    """global_num_samples // (num_ranks * local_micro_batch_size)."""
    return c.global_num_samples // (c.num_ranks * c.local_micro_batch_size)


@register_component("number_conversion", "local_num_batches_from_num_tokens", FromTokensConfig)
def local_batches_from_tokens(c: FromTokensConfig) -> int:
    """(global_num_tokens // sequence_length) // (num_ranks * local_micro_batch_size)."""
    return (c.global_num_tokens // c.sequence_length) // (c.num_ranks * c.local_micro_batch_size)


@register_component("number_conversion", "num_steps_from_num_samples", StepsFromSamplesConfig)
def steps_from_samples(c: StepsFromSamplesConfig) -> int:
    """global_num_samples // num_ranks // local_micro_batch_size // gradient_accumulation_steps."""
    return c.global_num_samples // c.num_ranks // c.local_micro_batch_size // c.gradient_accumulation_steps


@register_component("number_conversion", "num_steps_from_num_tokens", StepsFromTokensConfig)
def steps_from_tokens(c: StepsFromTokensConfig) -> int:
    """(global_num_tokens // sequence_length) // num_ranks // local_micro_batch_size // gradient_accumulation_steps."""
    samples = c.global_num_tokens // c.sequence_length
    return samples // c.num_ranks // c.local_micro_batch_size // c.gradient_accumulation_steps


@register_component("number_conversion", "num_tokens_from_num_steps", TokensFromNumStepsConfig)
def tokens_from_num_steps(c: TokensFromNumStepsConfig) -> int:
    """num_steps x num_ranks x local_micro_batch_size x sequence_length x gradient_accumulation_steps."""
    return c.num_steps * c.num_ranks * c.local_micro_batch_size * c.sequence_length * c.gradient_accumulation_steps


@register_component("number_conversion", "num_samples_from_num_tokens", SamplesFromTokensConfig)
def samples_from_tokens(c: SamplesFromTokensConfig) -> int:
    """num_tokens // sequence_length."""
    return c.num_tokens // c.sequence_length


@register_component("number_conversion", "num_tokens_from_packed_mem_map_dataset_continuous", TokensFromDatasetConfig)
def tokens_from_dataset(c: TokensFromDatasetConfig) -> int:
    """The tokens whole steps use of a .pbin: its blocks x sequence_length, cut to whole global steps."""

    samples = len(PackedContinuousDataset(c.dataset_path, c.sequence_length, "input_ids", c.reuse_last_target))
    steps = samples // c.num_ranks // c.local_micro_batch_size // c.gradient_accumulation_steps
    return steps * c.num_ranks * c.local_micro_batch_size * c.sequence_length * c.gradient_accumulation_steps


@dataclass(frozen=True)
class TokensFromSteps:
    per_step: int

    def __call__(self, num_steps_done: int) -> int:
        return num_steps_done * self.per_step


@register_component("number_conversion", "num_tokens_from_num_steps_callable", TokensFromStepsConfig)
def tokens_from_steps(c: TokensFromStepsConfig) -> TokensFromSteps:
    """steps -> steps x num_ranks x local_micro_batch_size x sequence_length."""
    return TokensFromSteps(c.num_ranks * c.local_micro_batch_size * c.sequence_length)
