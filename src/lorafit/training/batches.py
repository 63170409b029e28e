"""Micro-batches for training (from the resumable sampler) and for evaluation (every sample once), and the
evaluation loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lorafit.config.run_spec import RunSettings
from lorafit.data import collate as lorafit_collate
from lorafit.data.sampler import ResumableSampler
from lorafit.distributed.env import DistEnv
from lorafit.training.loss import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def default_collate(dataset: Any) -> Callable[[list[Batch]], Batch]:
    """The dataset's own collator (it knows the pad id), else lorafit's."""
    collate = getattr(dataset, "collate_fn", None)
    if callable(collate):
        return collate

    return lorafit_collate


def train_sampler(
    dataset_len: int,
    settings: RunSettings,
    rank: int,
    world: int,
    shuffle: bool = True,
    samples_per_epoch: int | None = None,
) -> ResumableSampler:
    """Rank `rank`'s sampler of a run's train data: the seed and global batch from `settings`; `samples_per_epoch`
    when the config layout fixes the epoch (BuiltRun.samples_per_epoch), else whole global batches."""
    sp = settings.step_profile
    return ResumableSampler(
        dataset_len,
        rank=rank,
        world_size=world,
        seed=settings.seed,
        shuffle=shuffle,
        global_batch_size=sp.local_train_micro_batch_size * sp.gradient_accumulation_steps * world,
        epoch_length=samples_per_epoch,
    )


def train_micro_batches(dataset: Any, sampler: Any, micro_batch_size: int, collate: Callable) -> Iterator[Batch]:
    """This rank's micro-batches, endlessly, from the sampler's current position.

    No DataLoader: reading a packed memmap is cheap next to a training step, and a DataLoader draws from the
    global RNG when an iterator starts, which would make a resumed run's random stream differ.
    """
    indices = sampler.forever()
    while True:
        yield collate([dataset[next(indices)] for _ in range(micro_batch_size)])


def eval_micro_batches(
    dataset: Any, env: DistEnv, micro_batch_size: int, max_batches: int | None, collate: Callable
) -> Iterator[Batch]:
    """Samples 0..N-1 once over all ranks (rank r: r, r+W, ...), `micro_batch_size` at a time.

    Every rank yields the same number of batches, because a sharded forward is a collective: a rank that has
    run out of samples evaluates a fully masked copy of sample 0, which adds nothing to the loss.
    """
    n, world = len(dataset), env.world_size
    per_rank = -(-n // world)
    batches = -(-per_rank // micro_batch_size)
    if max_batches is not None:
        batches = min(batches, max_batches)
    for b in range(batches):
        positions = [(b * micro_batch_size + j) * world + env.rank for j in range(micro_batch_size)]
        items = [dataset[p] for p in positions if p < n]
        if not items:
            item = dataset[0]
            items = [{**item, "labels": torch.full_like(item["labels"], IGNORE_INDEX)}]
        yield collate(items)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def held_out_losses(
    loss_fn: nn.Module,
    datasets: Mapping[str, Any],
    env: DistEnv,
    micro_batch_size: int,
    max_batches: int | None,
    autocast: Callable,
    collate: Callable | None = None,
    batch_sizes: Mapping[str, int] | None = None,
    mean: str = "token_mean",
) -> dict[str, float]:
    """The loss of each eval dataset through `loss_fn` (a `CausalLMLoss`, possibly wrapped): the mean over all
    its target tokens ("token_mean"), or the mean over its batches of each batch's token mean ("batch_mean",
    Modalities' evaluator). `batch_sizes[name]` (default `micro_batch_size`) samples a batch per rank. All ranks
    take part and get the result."""
    was_training = loss_fn.training
    loss_fn.eval()
    results = {}
    try:
        for name, dataset in datasets.items():
            total = torch.zeros(2, dtype=torch.float64, device=env.device)
            fn = collate or default_collate(dataset)
            size = (batch_sizes or {}).get(name, micro_batch_size)
            for batch in eval_micro_batches(dataset, env, size, max_batches, fn):
                batch = to_device(batch, env.device)
                with autocast():
                    loss_sum = loss_fn(**batch)
                targets = (batch["labels"] != IGNORE_INDEX).sum()
                if mean == "batch_mean":  # one term per batch that has targets (a padding batch has none)
                    total[0] += loss_sum.double() / targets.clamp(min=1)
                    total[1] += (targets > 0).double()
                else:
                    total[0] += loss_sum.double()
                    total[1] += targets
            env.all_reduce_sum(total)
            results[name] = float(total[0] / total[1].clamp(min=1))
    finally:
        loss_fn.train(was_training)
    return results
