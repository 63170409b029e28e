"""Map-style datasets over packed token files, the collator, and their `dataset/*` components.

Where the shift lives: in the datasets. Item t of `labels` is the target for position t of `input_ids`
(the next token), or -100 where the loss is masked (prompt tokens, padding). A block of sequence_length + 1
tokens gives sequence_length inputs and their shifted targets, so the loss is
`cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)`, never HF's internal shift.
The collator only pads.

    train_dataset:
      component_key: dataset
      variant_key: packed            # or instruction
      config:
        path: data/lorem_ipsum/packed  # the prefix given to `lorafit data pack --output` (or its .bin)
        sequence_length: null          # null: settings.step_profile.sequence_length (another number is refused)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from pydantic import Field

from lorafit.config.context import current_context
from lorafit.config.registry import ComponentConfig, register_component
from lorafit.console import info, warn
from lorafit.data.blocks import IGNORE_INDEX, TooLong, plan_conversations, positions_and_boundaries
from lorafit.data.token_files import PackedTokens, resolve_prefix
from lorafit.errors import UserError


class _PackedBase(torch.utils.data.Dataset):
    """Opens the packed file lazily: cheap to build (validate) and to pickle into DataLoader workers."""

    def __init__(self, path: str | os.PathLike, sequence_length: int | None = None):
        self.prefix = resolve_prefix(path)
        self.sequence_length = sequence_length
        self._data: PackedTokens | None = None

    @property
    def data(self) -> PackedTokens:
        if self._data is None:
            self._data = PackedTokens(self.prefix)
            if self.sequence_length is not None:
                self._prepare()
        return self._data

    def _seq(self) -> int:
        if self.sequence_length is None:
            raise RuntimeError(f"{type(self).__name__}({self.prefix}): sequence_length is not set yet")
        self.data  # noqa: B018 - opens and prepares
        return self.sequence_length

    def _prepare(self) -> None:
        """Checks and indexes that need both the data and the sequence length."""

    @property
    def pad_token_id(self) -> int:
        return self.data.pad_token_id

    @property
    def collate_fn(self) -> Collator:
        """The collator for this data (pads with the tokenizer's pad id)."""
        return Collator(pad_token_id=self.pad_token_id)

    def _labels(self, start: int, end: int) -> torch.Tensor:
        """Targets for positions start-1 .. end-2: tokens[start:end], -100 where the mask says not to train."""
        labels = torch.from_numpy(self.data.tokens[start:end].astype(np.int64))
        if self.data.mask is not None:
            labels[torch.from_numpy(self.data.mask[start:end] == 0)] = IGNORE_INDEX
        return labels

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        return i % n

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}  # memmaps reopen in the worker instead of being copied

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.prefix)!r}, sequence_length={self.sequence_length})"


class PackedDataset(_PackedBase):
    """Non-overlapping blocks of sequence_length + 1 tokens (stride sequence_length) over all documents.

    A document may continue into the next block (text); inside a block each document piece has its own
    positions from 0 and attends only to itself (`position_ids`; see `lorafit.data.blocks`).
    """

    def _prepare(self) -> None:
        seq = self.sequence_length
        if self._data.num_tokens < seq + 1:
            raise UserError(
                f"{self.prefix}.bin has {self._data.num_tokens} tokens, fewer than one block of "
                f"sequence_length + 1 = {seq + 1}",
                field="sequence_length",
            )

    def __len__(self) -> int:
        return (self.data.num_tokens - 1) // self._seq()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seq = self._seq()
        start = self._index(i) * seq
        inputs = torch.from_numpy(self.data.tokens[start : start + seq].astype(np.int64))
        labels = self._labels(start + 1, start + seq + 1)
        # documents in the block do not see each other: positions restart at each document (see lorafit.data.blocks),
        # and a document's last token is not trained to predict the next document's first
        positions, boundaries = positions_and_boundaries(self.data.offsets, start, seq)
        labels[torch.from_numpy(boundaries)] = IGNORE_INDEX
        return {"input_ids": inputs, "labels": labels, "position_ids": torch.from_numpy(positions)}


class InstructionDataset(_PackedBase):
    """One sample per conversation (document), cut to sequence_length inputs; prompt tokens get label -100.

    Conversations with no trained label left after the cut (an over-long prompt) are left out, with a warning,
    so that no batch is entirely masked.
    """

    def _prepare(self) -> None:
        data, seq = self._data, self.sequence_length
        starts = data.offsets[:-1]
        ends = np.minimum(data.offsets[1:], starts + seq + 1)
        if data.mask is None:
            trained = ends - starts - 1
        else:
            trained = _range_sums(data.mask, starts + 1, np.maximum(ends, starts + 1))
        self._keep = np.flatnonzero(trained > 0)
        cut = int(np.count_nonzero(data.offsets[1:] - starts > seq + 1))
        dropped = len(starts) - len(self._keep)
        if cut:
            warn(
                f"{self.prefix}: {cut} of {len(starts)} conversations are longer than sequence_length + 1 = "
                f"{seq + 1} tokens and are cut"
            )
        if dropped:
            warn(f"{self.prefix}: {dropped} conversations have no answer token within sequence_length and are left out")
        if not len(self._keep):
            raise UserError(
                f"{self.prefix}: no conversation has an answer token within the first {seq} tokens",
                field="sequence_length",
            )

    def __len__(self) -> int:
        self._seq()
        return len(self._keep)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seq = self._seq()
        doc = int(self._keep[self._index(i)])
        start = int(self.data.offsets[doc])
        end = min(int(self.data.offsets[doc + 1]), start + seq + 1)
        inputs = torch.from_numpy(self.data.tokens[start : end - 1].astype(np.int64))
        return {"input_ids": inputs, "labels": self._labels(start + 1, end)}


class PackedInstructionDataset(_PackedBase):
    """Blocks of up to sequence_length positions, each holding whole conversations (never one split in two).

    Every conversation keeps its own positions from 0 and attends only to itself; the block is as long as its
    conversations (the collator pads a batch to its longest block). `too_long` says what happens to a
    conversation longer than a block: `drop` (default) or `truncate`; both are counted and reported.
    """

    def __init__(self, path: str | os.PathLike, sequence_length: int | None = None, too_long: TooLong = "drop"):
        super().__init__(path, sequence_length)
        self.too_long = too_long
        self.plan = None

    def _prepare(self) -> None:
        data, seq = self._data, self.sequence_length
        starts = data.offsets[:-1]

        def trained_within(lengths: np.ndarray) -> np.ndarray:
            if data.mask is None:
                return lengths
            return _range_sums(data.mask, starts + 1, starts + 1 + np.maximum(lengths, 0))

        self.plan = plan_conversations(np.diff(data.offsets), trained_within, seq, self.too_long)
        if not self.plan.num_blocks:
            hint = " (too_long: drop; try sequence_length or too_long: truncate)" if self.plan.too_long else ""
            raise UserError(
                f"{self.prefix}: no conversation with an answer token fits a block of {seq} tokens{hint}",
                field="sequence_length",
            )
        message = self.plan.summary(str(self.prefix))
        (warn if self.plan.too_long or self.plan.dropped_untrained else info)(message)

    def __len__(self) -> int:
        self._seq()
        return self.plan.num_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self._seq()
        docs, lengths = self.plan.block(self._index(i))
        inputs, labels, positions = [], [], []
        for doc, length in zip(docs.tolist(), lengths.tolist(), strict=True):
            start = int(self.data.offsets[doc])
            inputs.append(torch.from_numpy(self.data.tokens[start : start + length].astype(np.int64)))
            labels.append(self._labels(start + 1, start + length + 1))
            positions.append(torch.arange(length))
        return {"input_ids": torch.cat(inputs), "labels": torch.cat(labels), "position_ids": torch.cat(positions)}


def _range_sums(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """sum(values[s:e]) for each (s, e), without a cumulative sum as long as `values` (it can be gigabytes):
    prefix sums only at the range boundaries, from one `np.add.reduceat` over the sorted boundaries."""
    points = np.unique(np.concatenate([starts, ends, [0]]))
    inside = points[points < len(values)]
    segments = np.add.reduceat(values, inside, dtype=np.int64)  # segment k: values[inside[k]:inside[k+1]]
    prefix = np.concatenate([[0], np.cumsum(segments)])  # prefix[k] = sum(values[:inside[k]]), last: total
    at = np.concatenate([inside, [len(values)]])
    return prefix[np.searchsorted(at, ends)] - prefix[np.searchsorted(at, starts)]


class Collator:
    """Pads a list of {"input_ids", "labels"[, "position_ids"]} items on the right to the longest (or to `pad_to`).

    Returns LongTensors input_ids (pad_token_id), labels (-100) and attention_mask (1 = real token), and for
    packed items position_ids (the padding's restart at 0). The loss passes position_ids INSTEAD of the 2D
    mask: transformers detects packed documents only without one (lorafit.training.loss).
    """

    def __init__(self, pad_token_id: int = 0, pad_to: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("an empty batch")
        longest = max(len(item["input_ids"]) for item in batch)
        length = self.pad_to or longest
        if length < longest:
            raise ValueError(f"a sample of {longest} tokens does not fit pad_to={self.pad_to}")
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        packed = "position_ids" in batch[0]
        # padding restarts at position 0: to the packed-sequence mask it is one more document, seen by nothing real
        position_ids = torch.arange(length).repeat(len(batch), 1) if packed else None
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
            if packed:
                position_ids[row, :n] = item["position_ids"]
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if packed:
            out["position_ids"] = position_ids
        return out


collate = Collator()


# --- components --------------------------------------------------------------------------------------------------
class PackedFileConfig(ComponentConfig):
    """A file written by `lorafit data pack`: `path` is its output prefix (or the .bin)."""

    path: str
    sequence_length: int | None = Field(None, ge=1)


def _build(cls: type[_PackedBase], config: PackedFileConfig) -> _PackedBase:
    prefix = resolve_prefix(config.path)
    for suffix in (".json", ".bin"):
        if not prefix.with_name(prefix.name + suffix).is_file():
            raise UserError(f"{prefix}{suffix} not found (pack the data with `lorafit data pack`)", field="path")
    dataset = cls(prefix, config.sequence_length)  # null in a run's config: the settings' (lorafit/run/build.py)
    if current_context().load_weights:  # `lorafit validate` only checks that the files are there
        dataset.data  # noqa: B018 - opens, checks sizes, and with a sequence length, indexes
    return dataset


@register_component("dataset", "packed", PackedFileConfig)
def build_packed_dataset(config: PackedFileConfig) -> PackedDataset:
    """Fixed-length blocks of a packed token file (labels shifted; -100 where the mask is 0)."""
    return _build(PackedDataset, config)


@register_component("dataset", "instruction", PackedFileConfig)
def build_instruction_dataset(config: PackedFileConfig) -> InstructionDataset:
    """One padded sample per conversation of a packed instruction file; loss on the answers only."""
    return _build(InstructionDataset, config)
