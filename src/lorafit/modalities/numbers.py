"""Modalities' number_conversion components: steps, batches and tokens from one another, by its formulas."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from lorafit.config.registry import ComponentConfig, register_component


class _Ranks(ComponentConfig):
    num_ranks: int = Field(gt=0)
    local_micro_batch_size: int = Field(gt=0)


class FromSamplesConfig(_Ranks):
    global_num_samples: int = Field(ge=0)


class FromTokensConfig(_Ranks):
    global_num_tokens: int = Field(ge=0)
    sequence_length: int = Field(gt=0)


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


@register_component("number_conversion", "num_steps_from_num_samples", FromSamplesConfig)
def steps_from_samples(c: FromSamplesConfig) -> int:
    """global_num_samples // (num_ranks * local_micro_batch_size) (Modalities' formula)."""
    return c.global_num_samples // (c.num_ranks * c.local_micro_batch_size)


@register_component("number_conversion", "num_steps_from_num_tokens", FromTokensConfig)
def steps_from_tokens(c: FromTokensConfig) -> int:
    """(global_num_tokens // sequence_length) // (num_ranks * local_micro_batch_size) (Modalities' formula)."""
    return (c.global_num_tokens // c.sequence_length) // (c.num_ranks * c.local_micro_batch_size)


@dataclass(frozen=True)
class TokensFromSteps:
    per_step: int

    def __call__(self, num_steps_done: int) -> int:
        return num_steps_done * self.per_step


@register_component("number_conversion", "num_tokens_from_num_steps_callable", TokensFromStepsConfig)
def tokens_from_steps(c: TokensFromStepsConfig) -> TokensFromSteps:
    """steps -> steps x num_ranks x local_micro_batch_size x sequence_length."""
    return TokensFromSteps(c.num_ranks * c.local_micro_batch_size * c.sequence_length)
