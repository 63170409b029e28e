"""Modalities' data components with Modalities' meaning: the continuous packed dataset, the collators (GPT-2
shift and loss masking), the samplers, the batch sampler and the data loader.

    dataset/packed_mem_map_dataset_continuous  {raw_data_path, sequence_length, sample_key, reuse_last_target}
        blocks of sequence_length + 1 tokens over the whole .pbin token stream (documents ignored); with
        reuse_last_target a block starts on the previous block's last token (stride sequence_length), else
        blocks do not overlap (stride sequence_length + 1). Item: {sample_key: the block}.
    collate_fn/gpt_2_llm_collator  {sample_key, target_key}: inputs block[:-1], targets block[1:]
    collate_fn/mask_loss_collator_wrapper  {wrapped_collate_fn, target_keys_to_mask, loss_ignore_index, mask_tokens,
        tokenizer}: targets strictly between a begin and an end marker token are trained on, all others get
        loss_ignore_index; Modalities' errors when a marker is missing from the batch or the markers do not alternate
    sampler/distributed_sampler, sampler/resumable_distributed_sampler, batch_sampler/default, data_loader/default

In lorafit the run's sampler (lorafit.data.sampler) draws the samples: the same global batches whatever the world
size, resumable exactly. The data loader reads in the training process (num_workers, pin_memory: no effect).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.data.pbin import read_pbin
from lorafit.datasets.packed import IGNORE_INDEX
from lorafit.errors import UserError

# ------------------------------------------------------------------------------------------------ dataset
Release = Literal["lora_branch", "0.5.0"]


class PackedMemMapDatasetContinuousConfig(ComponentConfig):
    """Modalities' `PackedMemMapDatasetContinuous`: fixed blocks of tokens of a .pbin file.

    `release` is which Modalities the config is written for, where they differ: with reuse_last_target false
    the lora branch cuts blocks of sequence_length + 1 tokens, modalities 0.5.0 of sequence_length. Not a
    Modalities key: the Modalities layout sets it from the config's settings block (settings.training: the lora
    branch; settings.step_profile: 0.5.0) and says so; give it to decide yourself."""

    raw_data_path: Path
    sequence_length: int = Field(gt=1)
    sample_key: str
    reuse_last_target: bool = True
    release: Release = "lora_branch"


class PackedContinuousDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        path: Path,
        sequence_length: int,
        sample_key: str,
        reuse_last_target: bool,
        release: Release = "lora_branch",
    ):
        self.path, self.sample_key = Path(path), sample_key
        self.sequence_length = sequence_length
        self.block = sequence_length if release == "0.5.0" and not reuse_last_target else sequence_length + 1
        self.stride = sequence_length if reuse_last_target else self.block
        self.pbin = read_pbin(path, field="raw_data_path")
        total = self.pbin.num_tokens
        if total < self.block:
            raise UserError(
                f"{path} holds {total} tokens, fewer than one block of {self.block}",
                field="sequence_length",
            )
        # Modalities: (total - block) // (block - 1) + 1 blocks with reuse_last_target, else total // block
        self.num_samples = (total - self.block) // self.stride + 1 if reuse_last_target else total // self.block

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        start = i * self.stride
        return {self.sample_key: torch.from_numpy(self.pbin.tokens[start : start + self.block].astype(np.int64))}


@register_component("dataset", "packed_mem_map_dataset_continuous", PackedMemMapDatasetContinuousConfig)
def build_packed_continuous(config: PackedMemMapDatasetContinuousConfig) -> PackedContinuousDataset:
    """Blocks of sequence_length + 1 tokens over a Modalities .pbin file (Modalities' continuous dataset)."""
    return PackedContinuousDataset(
        config.raw_data_path, config.sequence_length, config.sample_key, config.reuse_last_target, config.release
    )


# ------------------------------------------------------------------------------------------------ collators
class GPT2CollatorConfig(ComponentConfig):
    """Modalities' `GPT2LLMCollateFn`: inputs are each block but its last token, targets each block but its first."""

    sample_key: str
    target_key: str


@dataclass
class GPT2Collator:
    sample_key: str
    target_key: str

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        blocks = torch.stack([torch.as_tensor(item[self.sample_key]) for item in items])
        return {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:].clone()}


@register_component("collate_fn", "gpt_2_llm_collator", GPT2CollatorConfig)
def build_gpt2_collator(config: GPT2CollatorConfig) -> GPT2Collator:
    """Inputs block[:-1], targets block[1:] (the next-token shift)."""
    return GPT2Collator(config.sample_key, config.target_key)


class MaskTokens(ComponentConfig):
    b_include_to_loss_token: str
    e_include_to_loss_token: str


class MaskLossCollatorConfig(ComponentConfig):
    """Modalities' `LossMaskingCollateFnWrapper`: the loss only on targets strictly between the two marker tokens."""

    wrapped_collate_fn: Component("collate_fn")
    target_keys_to_mask: list[str]
    loss_ignore_index: int
    mask_tokens: MaskTokens
    tokenizer: Component("tokenizer")


@dataclass
class MaskLossCollator:
    wrapped: Any
    begin_id: int
    end_id: int
    tokenizer: Any = None

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = self.wrapped(items)
        batch["labels"] = mask_targets(batch["labels"], self.begin_id, self.end_id)
        return batch


def mask_targets(target: torch.Tensor, begin_id: int, end_id: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Modalities' rule, exactly: +1 on the target after each begin marker, -1 on each end marker, cumulative sum
    along the sequence; targets where it is 1 are kept, the rest (both markers included) get `ignore_index`."""
    missing = ""
    if not (target == begin_id).any():
        missing += "b_mask_token_id not found in target."
    if not (target == end_id).any():
        missing += "e_mask_token_id not found in target."
    if missing:
        raise UserError(
            f"{missing} in masking tokens for loss computation (mask_loss_collator_wrapper): make sure "
            "the tokenizer tokenizes as expected; a frequent source of error is the tokenization of "
            "spaces: ' <token>' and '<token>' are different tokens"
        )
    mask = torch.zeros_like(target)
    mask[:, 1:] += (target == begin_id)[:, :-1].to(mask.dtype)
    mask -= (target == end_id).to(mask.dtype)
    include = mask.cumsum(-1)
    if not ((include >= 0).all() and (include <= 1).all()):
        raise UserError(
            "end mask token indicator is before begin mask token indicator in the target "
            "(mask_loss_collator_wrapper): make sure to use padding and truncation with the tokenizer "
            "for packed_mem_map_dataset_continuous, so that every block starts outside an answer"
        )
    return torch.where(include.bool(), target, torch.full_like(target, ignore_index))


@register_component("collate_fn", "mask_loss_collator_wrapper", MaskLossCollatorConfig)
def build_mask_loss_collator(config: MaskLossCollatorConfig) -> MaskLossCollator:
    """Loss only strictly between b_include_to_loss_token and e_include_to_loss_token (Modalities' rule)."""
    wrapped = config.wrapped_collate_fn
    if not isinstance(wrapped, GPT2Collator):
        raise UserError("lorafit wraps collate_fn/gpt_2_llm_collator only", field="wrapped_collate_fn")
    if config.target_keys_to_mask != [wrapped.target_key]:
        raise UserError(
            f"the wrapped collator makes one target, '{wrapped.target_key}': target_keys_to_mask must be "
            f"[{wrapped.target_key}], not {config.target_keys_to_mask}",
            field="target_keys_to_mask",
        )
    if config.loss_ignore_index != IGNORE_INDEX:
        raise UserError(
            f"must be {IGNORE_INDEX}: clm_cross_entropy_loss ignores only {IGNORE_INDEX} (torch's "
            "CrossEntropyLoss default), so any other value would be trained on",
            field="loss_ignore_index",
        )
    tokenizer = config.tokenizer
    ids = []
    for key in ("b_include_to_loss_token", "e_include_to_loss_token"):
        token = getattr(config.mask_tokens, key)
        try:
            ids.append(_token_id(tokenizer, token))
        except UserError as e:
            raise e.prefixed(f"mask_tokens.{key}") from None
    if ids[0] == ids[1]:
        raise UserError(
            "b_mask_token_id and e_mask_token_id of the LossMaskingCollateFnWrapper must be different",
            field="mask_tokens",
        )
    return MaskLossCollator(wrapped, ids[0], ids[1], tokenizer)


def _token_id(tokenizer: Any, token: str) -> int:
    if hasattr(tokenizer, "get_token_id"):
        return tokenizer.get_token_id(token)
    if token not in tokenizer.get_vocab():
        raise UserError(f"'{token}' is not a single token of the tokenizer's vocabulary")
    return int(tokenizer.convert_tokens_to_ids(token))


# ------------------------------------------------------------------------------------------------ samplers
class DistributedSamplerConfig(ComponentConfig):
    """Modalities' `sampler/distributed_sampler` (torch's DistributedSampler with drop_last)."""

    rank: int = Field(ge=0)
    num_replicas: int = Field(ge=0)
    shuffle: bool
    dataset: Component("dataset")
    seed: int = 0
    drop_last: Literal[True] = True


class ResumableDistributedSamplerConfig(DistributedSamplerConfig):
    """modalities 0.5.0's `sampler/resumable_distributed_sampler`."""

    epoch: int = Field(0, ge=0)
    skip_num_global_samples: int = Field(0, ge=0)
    drop_last: bool = True


@dataclass
class SamplerSpec:
    """What the run's sampler takes from the config: shuffle and seed; rank and world size are the process's."""

    dataset: Any
    shuffle: bool
    seed: int


def _check_rank(config: DistributedSamplerConfig) -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if (config.num_replicas, config.rank) != (world, rank):
        raise UserError(
            f"num_replicas {config.num_replicas} / rank {config.rank} are not this process's "
            f"(WORLD_SIZE {world}, RANK {rank}): use ${{cuda_env:WORLD_SIZE}} and ${{cuda_env:RANK}}"
        )


@register_component("sampler", "distributed_sampler", DistributedSamplerConfig)
def build_distributed_sampler(config: DistributedSamplerConfig) -> SamplerSpec:
    """Each rank's share of the dataset, shuffled by seed per epoch (lorafit's resumable sampler draws them)."""
    _check_rank(config)
    return SamplerSpec(config.dataset, config.shuffle, config.seed)


@register_component("sampler", "resumable_distributed_sampler", ResumableDistributedSamplerConfig)
def build_resumable_sampler(config: ResumableDistributedSamplerConfig) -> SamplerSpec:
    """As distributed_sampler; lorafit resumes from its checkpoints (--resume_from), not from a sample count."""
    _check_rank(config)
    if config.epoch or config.skip_num_global_samples or not config.drop_last:
        raise UserError(
            "epoch, skip_num_global_samples and drop_last: false are Modalities' manual resume; lorafit "
            "resumes the data position with --resume_from (leave epoch 0, skip 0, drop_last true)"
        )
    return SamplerSpec(config.dataset, config.shuffle, config.seed)


class BatchSamplerConfig(ComponentConfig):
    sampler: Component("sampler")
    batch_size: int = Field(gt=0)
    drop_last: Literal[True] = True


@dataclass
class BatchSamplerSpec:
    sampler: SamplerSpec
    batch_size: int


@register_component("batch_sampler", "default", BatchSamplerConfig)
def build_batch_sampler(config: BatchSamplerConfig) -> BatchSamplerSpec:
    """Micro-batches of batch_size samples of the sampler (incomplete ones dropped)."""
    return BatchSamplerSpec(config.sampler, config.batch_size)


# ------------------------------------------------------------------------------------------------ data loader
class DataLoaderConfig(ComponentConfig):
    """Modalities' `LLMDataLoader` (data_loader/default)."""

    dataloader_tag: str
    dataset: Component("dataset")
    batch_sampler: Component("batch_sampler")
    collate_fn: Component("collate_fn") | None = None
    num_workers: int = Field(ge=0)
    pin_memory: bool
    shuffle: bool = False  # the lora branch's key (no effect there either: its sampler shuffles); gone in 0.5.0
    skip_num_batches: int = Field(0, ge=0)
    fixed_num_batches: int | None = Field(None, gt=0)


class CollatedView(torch.utils.data.Dataset):
    """A dataset with the loader's collator attached (the run reads `collate_fn` from its datasets), cut to the
    samples Modalities' loader visits (whole micro-batches on every rank)."""

    def __init__(self, dataset: Any, collate_fn: Any, length: int):
        self.dataset, self.collate_fn, self.length = dataset, collate_fn, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]


@dataclass
class ModalitiesLoader:
    tag: str
    dataset: Any
    collate_fn: Any
    micro_batch_size: int
    shuffle: bool
    seed: int
    fixed_num_batches: int | None

    def local_num_batches(self, world_size: int) -> int:
        """Micro-batches per rank in one pass: DistributedSampler(drop_last) gives floor(N / W) samples per rank,
        the batch sampler floor(that / batch_size) batches, fixed_num_batches caps them."""
        batches = len(self.dataset) // world_size // self.micro_batch_size
        return min(batches, self.fixed_num_batches) if self.fixed_num_batches is not None else batches

    def epoch_samples(self, world_size: int) -> int:
        """Samples one pass of the loader trains on, over all ranks: whole micro-batches on every rank."""
        return self.local_num_batches(world_size) * self.micro_batch_size * world_size

    def view(self, world_size: int, *, whole: bool = False) -> CollatedView:
        """The dataset with the collator; `whole`: all samples (the train sampler permutes all of them, as torch's
        DistributedSampler does, and takes `epoch_samples`), else cut to the samples one pass visits."""
        length = len(self.dataset) if whole else self.epoch_samples(world_size)
        return CollatedView(self.dataset, self.collate_fn or _default_collate, length)


def _default_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    raise UserError("a data_loader without collate_fn gives raw samples; give it collate_fn/gpt_2_llm_collator")


@register_component("data_loader", "default", DataLoaderConfig)
def build_data_loader(config: DataLoaderConfig) -> ModalitiesLoader:
    """Micro-batches of the dataset through the collator; the run's sampler decides the order."""
    sampler = config.batch_sampler.sampler
    if sampler.dataset is not config.dataset:
        raise UserError(
            "the batch sampler's sampler reads another dataset than the data loader's: give both the "
            "same {instance_key: ..., pass_type: BY_REFERENCE}",
            field="batch_sampler",
        )
    if config.skip_num_batches:
        raise UserError(
            "skip_num_batches is Modalities' manual resume; lorafit resumes the data position with "
            "--resume_from: leave it 0",
            field="skip_num_batches",
        )
    loader = ModalitiesLoader(
        config.dataloader_tag,
        config.dataset,
        config.collate_fn,
        config.batch_sampler.batch_size,
        sampler.shuffle,
        sampler.seed,
        config.fixed_num_batches,
    )
    world = int(os.environ.get("WORLD_SIZE", 1))
    if loader.local_num_batches(world) == 0:
        raise UserError(
            f"'{config.dataloader_tag}': {len(config.dataset)} samples make no micro-batch of "
            f"{loader.micro_batch_size} per rank on {world} process(es)"
        )
    return loader
