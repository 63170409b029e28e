"""Packing documents into fixed blocks without cross-contamination.

A packed block holds several documents side by side. Each document sees only itself: its positions restart
at 0 (`position_ids`), and transformers' own packed-sequence path (`masking_utils.find_packed_sequence_indices`,
used when a model gets `position_ids` and no 2D attention mask) turns every restart into a block-diagonal causal
mask, for sdpa, eager and flex attention alike; flash attention reads the same restarts as sequence boundaries.
No target crosses a boundary: the last token of one document never learns to predict the first of the next.

Instruction data is bin-packed WHOLE: a conversation is never split over two blocks, so an answer is never
trained without its prompt. Conversations are placed by best-fit decreasing (longest first, each into the fullest
block it fits), which is deterministic: the same data and block length always give the same blocks; the
sampler then orders the blocks with the run's seed. A conversation longer than a block is dropped (default) or
truncated (`too_long: truncate`), counted and reported.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Literal

import numpy as np

TooLong = Literal["drop", "truncate"]

# the label of a position without a loss (prompt, padding, a block's last token): cross_entropy's default ignore_index
IGNORE_INDEX = -100


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) whose lengths sum to at most `capacity`; every item <= capacity.

    Items go longest first (ties: lower index first) into the bin with the least room that still fits them.
    O(n log n) searches over a sorted list of (room left, bin index).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"an item of {int(lengths.max())} does not fit a bin of {capacity}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for item in order.tolist():
        need = int(lengths[item])
        at = bisect_left(room, (need, -1))
        if at == len(room):
            bins.append([item])
            left, index = capacity - need, len(bins) - 1
        else:
            left, index = room.pop(at)
            bins[index].append(item)
            left -= need
        if left > 0:
            insort(room, (left, index))
    return bins


@dataclass(frozen=True)
class PackPlan:
    """Which conversations go into which block, and what was left out or cut.

    `docs` and `lengths` list every kept conversation block after block; block b is entries
    `block_offsets[b]:block_offsets[b + 1]`. `lengths` are input positions (tokens - 1: the targets are shifted).
    """

    docs: np.ndarray
    lengths: np.ndarray
    block_offsets: np.ndarray
    capacity: int
    total: int
    too_long: int
    truncated: int
    dropped_too_long: int
    dropped_untrained: int

    @property
    def num_blocks(self) -> int:
        return len(self.block_offsets) - 1

    @property
    def efficiency(self) -> float:
        """Real tokens / block tokens."""
        return float(self.lengths.sum()) / max(1, self.num_blocks * self.capacity)

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        a, z = self.block_offsets[b], self.block_offsets[b + 1]
        return self.docs[a:z], self.lengths[a:z]

    def summary(self, name: str) -> str:
        parts = [
            f"{name}: {self.total - self.dropped_too_long - self.dropped_untrained:,} conversations packed whole "
            f"into {self.num_blocks:,} blocks of {self.capacity} tokens, packing efficiency "
            f"{100 * self.efficiency:.1f}% (real tokens / block tokens)"
        ]
        if self.too_long:
            action = "truncated to it" if self.truncated else "dropped (too_long: drop)"
            parts.append(
                f"{self.too_long:,} of {self.total:,} longer than sequence_length + 1 = {self.capacity + 1} "
                f"tokens were {action}"
            )
        if self.dropped_untrained:
            parts.append(f"{self.dropped_untrained:,} had no answer token (left out)")
        return "; ".join(parts)


def plan_conversations(token_counts: np.ndarray, trained_within, capacity: int, too_long: TooLong) -> PackPlan:
    """Plan blocks of `capacity` input positions for conversations of `token_counts` tokens.

    `trained_within(lengths)` gives, per conversation, the number of trained targets among its first `lengths`
    input positions (the caller knows the loss mask); conversations with none are left out.
    """
    if too_long not in ("drop", "truncate"):
        raise ValueError(f"too_long must be 'drop' or 'truncate', not {too_long!r}")
    positions = np.asarray(token_counts, dtype=np.int64) - 1
    over = positions > capacity
    lengths = np.minimum(positions, capacity)
    keep = positions > 0
    if too_long == "drop":
        keep &= ~over
    trained = trained_within(lengths)
    untrained = keep & (trained <= 0)
    keep &= trained > 0
    kept = np.flatnonzero(keep)
    bins = best_fit_decreasing(lengths[kept], capacity)
    docs = np.fromiter((kept[i] for b in bins for i in b), dtype=np.int64, count=len(kept))
    sizes = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    n_over = int(over.sum())
    return PackPlan(
        docs=docs,
        lengths=lengths[docs],
        block_offsets=np.concatenate([[0], np.cumsum(sizes)]),
        capacity=capacity,
        total=len(positions),
        too_long=n_over,
        truncated=n_over if too_long == "truncate" else 0,
        dropped_too_long=n_over if too_long == "drop" else 0,
        dropped_untrained=int(untrained.sum()),
    )


def positions_and_boundaries(offsets: np.ndarray, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """For inputs tokens[start:start+length] of a stream of documents (document i starts at offsets[i]):
    the position of each input within its document piece (0 at a document start and at `start`), and the
    input indices whose target would be the first token of the next document (their label is masked)."""
    inside = offsets[(offsets > start) & (offsets <= start + length)] - start  # document starts in the block
    index = np.arange(length, dtype=np.int64)
    piece_starts = np.concatenate([[0], inside[inside < length]])
    positions = index - piece_starts[np.searchsorted(piece_starts, index, side="right") - 1]
    return positions, inside - 1
