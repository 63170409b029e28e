"""A deterministic, resumable distributed sampler whose global batches do not depend on the world size.

The contract, precisely:

- Epoch e orders the dataset by `torch.randperm(N, generator=torch.Generator().manual_seed(seed + e))`
  (or 0..N-1 without shuffle). Every rank computes the same order; no communication is needed.
- The epoch is `epoch_length` global samples long: with `drop_last`, N rounded down to a multiple of
  `global_batch_size` (or of `world_size` when that is not given; the dropped tail differs every epoch);
  without it, N rounded up to a multiple of `world_size` by repeating the order's first samples.
- Global position p of the epoch is sample `order[p % N]`. Rank r of W receives positions r, r + W, r + 2W, ...
  So when every rank draws micro batches of m samples, micro step s of all ranks together covers global
  positions [s*m*W, (s+1)*m*W): exactly the samples one process with micro batch m*W draws in step s,
  and, with gradient accumulation, the same samples per optimizer step. Only the order inside a global
  batch differs (interleaved by rank), which a mean over the batch does not see.
- The state is `{epoch, consumed}`: `consumed` counts global samples of the epoch already trained on.
  It moves only through `advance(n_global)` (after a step: n_global = samples of that step over all ranks)
  or `set_epoch(e)`; iterating does not move it, because a DataLoader prefetches ahead of training.
  Reaching `epoch_length` moves to the next epoch, carrying any excess over (the `forever()` stream crosses
  epochs inside a batch).
- After `load_state_dict(sd)`, iteration starts at position `consumed` of epoch `epoch`: nothing seen is
  repeated and nothing is skipped. The world size may differ from the saving run's as long as `consumed`
  is a multiple of the new one (true when the global batch size is unchanged).
- For the same global batches for any world size across epoch ends, `epoch_length` must not depend on
  the world size: pass `global_batch_size` (samples per optimizer step over all ranks) with `drop_last`.
- `epoch_length` may also be given (a multiple of the world size, at most N): the order still permutes all N
  samples and the epoch ends after that many. This is torch's DistributedSampler(drop_last) followed by
  BatchSampler(drop_last), sample for sample on every rank, when epoch_length = floor(floor(N / W) / m) * m * W
  (Modalities' data loaders).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from lorafit.errors import UserError


class ResumableSampler(Sampler[int]):
    """Indices of this rank's samples; see the module docstring for the exact contract."""

    def __init__(
        self,
        dataset_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        global_batch_size: int | None = None,
        epoch_length: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        unit = global_batch_size or world_size
        if global_batch_size is not None and (global_batch_size < 1 or global_batch_size % world_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of world_size {world_size}")
        self.dataset_len = int(dataset_len)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.global_batch_size = global_batch_size
        if epoch_length is not None:
            if epoch_length % world_size or not 0 < epoch_length <= self.dataset_len:
                raise ValueError(
                    f"epoch_length {epoch_length}: a multiple of world_size {world_size}, "
                    f"at most the {self.dataset_len} samples"
                )
            self.epoch_length = epoch_length
        elif drop_last:
            self.epoch_length = self.dataset_len // unit * unit
        else:
            self.epoch_length = -(-self.dataset_len // world_size) * world_size
        if self.epoch_length == 0:
            raise UserError(f"the dataset has {self.dataset_len} samples, fewer than one global batch ({unit})")
        self.epoch = 0
        self.consumed = 0
        self._order_cache: tuple[int, list[int]] | None = None

    # --- the order -------------------------------------------------------------------------------------------
    def order(self, epoch: int) -> list[int]:
        """The epoch's order of all N samples (cached for the current epoch)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.dataset_len, generator=generator).tolist()
            else:
                order = list(range(self.dataset_len))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _epoch_indices(self, epoch: int, start: int) -> Iterator[int]:
        order = self.order(epoch)
        for position in range(start + self.rank, self.epoch_length, self.world_size):
            yield order[position % self.dataset_len]

    def __iter__(self) -> Iterator[int]:
        """This rank's remaining samples of the current epoch (from `consumed`)."""
        return self._epoch_indices(self.epoch, self.consumed)

    def __len__(self) -> int:
        return (self.epoch_length - self.consumed) // self.world_size

    def forever(self) -> Iterator[int]:
        """This rank's samples from the current state on, epoch after epoch, without end."""
        epoch, start = self.epoch, self.consumed
        while True:
            yield from self._epoch_indices(epoch, start)
            epoch, start = epoch + 1, 0

    # --- progress --------------------------------------------------------------------------------------------
    def advance(self, n_global_samples: int) -> None:
        """Record that `n_global_samples` (over all ranks) have been trained on."""
        if n_global_samples < 0 or n_global_samples % self.world_size:
            raise ValueError(f"advance({n_global_samples}): must be a multiple of world_size {self.world_size}")
        self.consumed += n_global_samples
        self.epoch += self.consumed // self.epoch_length
        self.consumed %= self.epoch_length

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning (torch's DistributedSampler API)."""
        self.epoch, self.consumed = int(epoch), 0

    @property
    def global_position(self) -> int:
        """Global samples consumed since epoch 0 began."""
        return self.epoch * self.epoch_length + self.consumed

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "dataset_len": self.dataset_len,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; a different dataset, seed or shuffle would silently change the data: refuse."""
        for key in ("dataset_len", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(
                    f"cannot resume the data order: the checkpoint's sampler had {key}={state[key]!r}, this run has "
                    f"{getattr(self, key)!r} (the dataset or settings.seed changed since the checkpoint)"
                )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed % self.world_size or not 0 <= consumed < self.epoch_length:
            raise UserError(
                f"cannot resume the data order: {consumed} samples consumed in the epoch is not a position of "
                f"world size {self.world_size} with {self.epoch_length} samples per epoch (the global batch changed?)"
            )
        self.epoch, self.consumed = epoch, consumed
