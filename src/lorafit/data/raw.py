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
differ from what its stamp (`<cache_path>.source.json`) records. It only ever replaces files it wrote itself
for the same source: anything else at `cache_path` (the user's own `corpus.bin`, a `lorafit data pack` output,
the cache of another file) is refused with an error naming `cache_path`, under `lorafit validate` too.
Under torchrun rank 0 packs and the other ranks wait (concurrent writers would race); across nodes without a
shared file system, pack on each node first with `lorafit data pack`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lorafit.config.context import current_context
from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.console import info, is_main_rank
from lorafit.data.datasets import InstructionDataset, PackedDataset, PackedInstructionDataset
from lorafit.data.pack import pack_file, resolve_prefix
from lorafit.errors import UserError, describe_storage_error, storage_error


class RawTextConfig(ComponentConfig):
    """A .txt or .jsonl file tokenized with `tokenizer` into `cache_path` (a packed-file prefix) on first use."""

    path: str
    tokenizer: Component("tokenizer")
    cache_path: str | None = None
    jsonl_field: str = "text"
    sequence_length: int | None = Field(None, ge=1)


class RawInstructionConfig(ComponentConfig):
    """A .jsonl file of conversations rendered with `tokenizer`'s chat template into `cache_path` on first use.

    `packing: true` bin-packs whole conversations into blocks of up to sequence_length tokens (several per
    sample, each attending only to itself, never one split over two blocks; lorafit.data.packing); false gives
    one padded sample each. `too_long` (packing only): a conversation longer than a block is dropped (default:
    a cut answer would train the model to stop mid-answer, or never to stop) or truncated; both are reported.
    """

    path: str
    tokenizer: Component("tokenizer")
    cache_path: str | None = None
    sequence_length: int | None = Field(None, ge=1)
    packing: bool = False
    too_long: Literal["drop", "truncate"] = "drop"


CACHE_MARK = "lorafit dataset cache"  # in every stamp the cache writes: what proves the files are its own
_CACHE_SUFFIXES = (".bin", ".mask.bin", ".json", ".source.json")


def _file(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


def _fingerprint(source: Path, tokenizer: Any, kind: str, jsonl_field: str | None) -> dict[str, Any]:
    stat = source.stat()
    return {"written_by": CACHE_MARK, "source_path": str(source.resolve()), "kind": kind, "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "jsonl_field": jsonl_field,
            "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer)}  # fmt: skip


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _index_stat(prefix: Path) -> list[int] | None:
    try:
        stat = _file(prefix, ".json").stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _write_stamp(prefix: Path, stamp: dict[str, Any]) -> None:
    path = _file(prefix, ".source.json")
    temp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    temp.write_text(json.dumps(stamp), encoding="utf-8")
    os.replace(temp, path)


def check_cache_owner(source: Path, prefix: Path) -> None:
    """Raise unless the files at `prefix` are absent or the cache's own for `source`: never replace a user's file.

    Owned means: a stamp carrying CACHE_MARK for this very source file, and an index that is still the one the
    cache wrote (a `lorafit data pack --overwrite` onto the prefix since then makes it the user's).
    """
    existing = [_file(prefix, s) for s in _CACHE_SUFFIXES if _file(prefix, s).exists() or _file(prefix, s).is_symlink()]
    if not existing:
        return
    stamp = _read_json(_file(prefix, ".source.json"))
    if _is_legacy_stamp(stamp, source, prefix):
        return
    ours = isinstance(stamp, dict) and stamp.get("written_by") == CACHE_MARK
    if ours and stamp.get("source_path") == str(source.resolve()):
        if stamp.get("state") == "packing" or stamp.get("index") in (None, _index_stat(prefix)):
            return
        why = "the index was rewritten by something else since the cache wrote it"
    elif ours:
        why = f"they are the cache of another file, {stamp.get('source_path')}"
    else:
        index = _read_json(_file(prefix, ".json"))
        packed = isinstance(index, dict) and isinstance(index.get("source"), dict)
        why = (f"they are a `lorafit data pack` output of {index['source'].get('path')}" if packed
               else "lorafit did not write them")  # fmt: skip
    names = ", ".join(p.name for p in existing)
    raise UserError(f"{prefix} holds {names}, which the dataset cache may not replace ({why}); choose another "
                    f"cache_path (or delete those files yourself)", field="cache_path")  # fmt: skip


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


_LEGACY_STAMP_KEYS = {"kind", "bytes", "mtime_ns", "jsonl_field", "tokenizer", "vocab_size"}


def _is_legacy_stamp(stamp: Any, source: Path, prefix: Path) -> bool:
    """A stamp from before CACHE_MARK existed, beside an index packed from this same source: still the cache's."""
    if not (isinstance(stamp, dict) and stamp.keys() == _LEGACY_STAMP_KEYS):
        return False
    index = _read_json(_file(prefix, ".json"))
    recorded = index.get("source", {}).get("path") if isinstance(index, dict) else None
    return isinstance(recorded, str) and Path(recorded).resolve() == source.resolve()


def _is_fresh(source: Path, tokenizer: Any, prefix: Path, kind: str, jsonl_field: str | None) -> bool:
    stamp = _read_json(_file(prefix, ".source.json"))
    if not (_file(prefix, ".json").is_file() and isinstance(stamp, dict)):
        return False  # no stamp, or a damaged one: pack again (if the files are ours)
    recorded = {k: v for k, v in stamp.items() if k != "index"}
    return recorded == _fingerprint(source, tokenizer, kind, jsonl_field) and stamp.get("index") == _index_stat(prefix)


def _pack_if_stale(source: Path, tokenizer: Any, prefix: Path, kind: str, jsonl_field: str | None) -> Path:
    if _is_fresh(source, tokenizer, prefix, kind, jsonl_field):
        return prefix
    check_cache_owner(source, prefix)
    info(f"tokenizing {source} into {prefix}.bin (cached for later runs)")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        # claim the prefix before writing: a pack interrupted from here on still leaves files known to be ours
        _write_stamp(prefix, {"written_by": CACHE_MARK, "source_path": str(source.resolve()), "state": "packing"})
        pack_file(source, tokenizer, prefix, jsonl_field=jsonl_field or "text", fmt=kind, overwrite=True,
                  progress=is_main_rank(), replace_checked=True)  # fmt: skip
        _write_stamp(prefix, {**_fingerprint(source, tokenizer, kind, jsonl_field), "index": _index_stat(prefix)})
    except OSError as error:  # a read-only or full cache location: the user's to change, named by its YAML key
        reason = describe_storage_error(error) if storage_error(error) else str(error)
        raise UserError(f"cannot write the dataset cache {prefix}: {reason}", field="cache_path") from None
    return prefix


def _build(config: RawTextConfig | RawInstructionConfig, kind: str, make: Any) -> Any:
    source = Path(config.path)
    if not source.is_file():
        raise UserError(f"file not found: {source}", field="path")
    default = source.with_suffix(f".{kind}")
    prefix = resolve_prefix(config.cache_path) if config.cache_path else default
    if not current_context().load_weights:  # `lorafit validate`: nothing is tokenized, the cache path is checked
        check_cache_owner(source, prefix)
        return make(prefix, config.sequence_length)
    prefix = ensure_packed(source, config.tokenizer, prefix, kind, getattr(config, "jsonl_field", None))
    dataset = make(prefix, config.sequence_length)
    dataset.data  # noqa: B018 - opens and checks now rather than in the training loop
    return dataset


@register_component("dataset", "text", RawTextConfig)
def build_text_dataset(config: RawTextConfig) -> PackedDataset:
    """Fixed-length blocks of a raw text file, tokenized into a cache on first use."""
    return _build(config, "text", PackedDataset)


@register_component("dataset", "jsonl_instruction", RawInstructionConfig)
def build_jsonl_instruction_dataset(config: RawInstructionConfig) -> InstructionDataset:
    """One sample per conversation of a raw .jsonl file, tokenized into a cache on first use."""
    if config.packing:
        return _build(config, "instruction", lambda *a: PackedInstructionDataset(*a, too_long=config.too_long))
    return _build(config, "instruction", InstructionDataset)
