"""`dataset/text` and `dataset/jsonl_instruction`: a raw file + a tokenizer component, packed into a cache on first use.

    train_dataset:
      component_key: dataset
      variant_key: jsonl_instruction      # or text (.txt paragraphs, or a .jsonl text field)
      config:
        path: data/task/train.jsonl
        tokenizer: {instance_key: tokenizer, pass_type: BY_REFERENCE}
        cache_path: null                  # default: next to `path`, e.g. data/task/train.instruction
        sequence_length: null             # null: the run's settings.step_profile.sequence_length

The cache is packed again when its source file (size, modification time) or tokenizer (name, vocabulary size)
differ from what its index records. Under torchrun rank 0 packs and the other ranks wait (concurrent writers
would race); across nodes without a shared file system, pack on each node first with `lorafit data pack`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from lorafit.config.context import current_context
from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.console import info, is_main_rank
from lorafit.data.datasets import InstructionDataset, PackedDataset
from lorafit.data.pack import pack_file, resolve_prefix
from lorafit.errors import UserError


class RawTextConfig(ComponentConfig):
    """A .txt or .jsonl file tokenized with `tokenizer` into `cache_path` (a packed-file prefix) on first use."""

    path: str
    tokenizer: Component("tokenizer")
    cache_path: str | None = None
    jsonl_field: str = "text"
    sequence_length: int | None = Field(None, ge=1)


class RawInstructionConfig(ComponentConfig):
    """A .jsonl file of conversations rendered with `tokenizer`'s chat template into `cache_path` on first use.

    `packing: true` concatenates conversations into fixed blocks of sequence_length (no padding, several
    conversations per sample; the loss stays on the answers only); false gives one padded sample each.
    """

    path: str
    tokenizer: Component("tokenizer")
    cache_path: str | None = None
    sequence_length: int | None = Field(None, ge=1)
    packing: bool = False


def _fingerprint(source: Path, tokenizer: Any, kind: str, jsonl_field: str | None) -> dict[str, Any]:
    stat = source.stat()
    return {"kind": kind, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "jsonl_field": jsonl_field,
            "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer)}  # fmt: skip


def ensure_packed(source: Path, tokenizer: Any, prefix: Path, kind: str, jsonl_field: str | None = None) -> Path:
    """`prefix`, packed from `source` unless an up-to-date cache is already there.

    Under torchrun, rank 0 packs while the other ranks wait for it (one writer, no race); every rank then
    checks that it sees the cache, which fails clearly on nodes without a shared file system.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _pack_if_stale(source, tokenizer, prefix, kind, jsonl_field)
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            _pack_if_stale(source, tokenizer, prefix, kind, jsonl_field)
            outcome[0] = ("ok", "")
        except UserError as error:
            outcome[0] = ("error", error.render())
    dist.broadcast_object_list(outcome, src=0)
    status, message = outcome[0]
    if status == "error":
        raise UserError(message)
    if not _is_fresh(source, tokenizer, prefix, kind, jsonl_field):
        raise UserError(
            f"rank {dist.get_rank()} cannot see {prefix}.json that rank 0 wrote (no shared file system?); without "
            f"one, pack once with `lorafit data pack --input {source} --tokenizer <folder> --output {prefix}`, copy "
            "the files to every node and read them with dataset/packed or dataset/instruction",
            field="cache_path",
        )
    return prefix


def _is_fresh(source: Path, tokenizer: Any, prefix: Path, kind: str, jsonl_field: str | None) -> bool:
    stamp_path = prefix.with_name(prefix.name + ".source.json")
    meta_path = prefix.with_name(prefix.name + ".json")
    if not (meta_path.is_file() and stamp_path.is_file()):
        return False
    try:
        return json.loads(stamp_path.read_text(encoding="utf-8")) == _fingerprint(source, tokenizer, kind, jsonl_field)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # a damaged stamp: pack again


def _pack_if_stale(source: Path, tokenizer: Any, prefix: Path, kind: str, jsonl_field: str | None) -> Path:
    if _is_fresh(source, tokenizer, prefix, kind, jsonl_field):
        return prefix
    info(f"tokenizing {source} into {prefix}.bin (cached for later runs)")
    pack_file(source, tokenizer, prefix, jsonl_field=jsonl_field or "text", fmt=kind, overwrite=True,
              progress=is_main_rank())  # fmt: skip
    stamp = prefix.with_name(prefix.name + ".source.json")
    stamp.write_text(json.dumps(_fingerprint(source, tokenizer, kind, jsonl_field)), encoding="utf-8")
    return prefix


def _build(config: RawTextConfig | RawInstructionConfig, kind: str, cls: type) -> Any:
    source = Path(config.path)
    if not source.is_file():
        raise UserError(f"file not found: {source}", field="path")
    default = source.with_suffix(f".{kind}")
    prefix = resolve_prefix(config.cache_path) if config.cache_path else default
    if not current_context().load_weights:  # `lorafit validate`: nothing is tokenized
        return cls(prefix, config.sequence_length)
    prefix = ensure_packed(source, config.tokenizer, prefix, kind, getattr(config, "jsonl_field", None))
    dataset = cls(prefix, config.sequence_length)
    dataset.data  # noqa: B018 - opens and checks now rather than in the training loop
    return dataset


@register_component("dataset", "text", RawTextConfig)
def build_text_dataset(config: RawTextConfig) -> PackedDataset:
    """Fixed-length blocks of a raw text file, tokenized into a cache on first use."""
    return _build(config, "text", PackedDataset)


@register_component("dataset", "jsonl_instruction", RawInstructionConfig)
def build_jsonl_instruction_dataset(config: RawInstructionConfig) -> InstructionDataset:
    """One sample per conversation of a raw .jsonl file, tokenized into a cache on first use."""
    return _build(config, "instruction", PackedDataset if config.packing else InstructionDataset)
