"""`dataset/text` and `dataset/jsonl_instruction`: a raw file + a tokenizer component, packed into a cache on first use.

    train_dataset:
      component_key: dataset
      variant_key: jsonl_instruction      # or text (.txt paragraphs, or a .jsonl text field)
      config:
        path: data/task/train.jsonl
        tokenizer: {instance_key: tokenizer, pass_type: BY_REFERENCE}
        cache_path: null                  # default: lorafit's cache folder (lorafit.data.cache_dir)
        sequence_length: null             # null: the run's settings.step_profile.sequence_length
        format: auto                      # or messages, sharegpt, alpaca, prompt_response (lorafit.data.formats)
        columns: null                     # e.g. {prompt: question, response: answer}

The cache is keyed by content: it is packed again when the sha256 of the source's bytes, of the tokenizer
(its vocabulary, merges, normalisation and special tokens), of its chat template, or the format settings differ
from what its stamp (`<cache_path>.source.json`) records; editing the data or the template in place
invalidates it, touching a file does not. It only ever replaces files it wrote itself for the same source:
anything else at `cache_path` (the user's own `corpus.bin`, a `lorafit data pack` output, the cache of another
file) is refused with an error naming `cache_path`, under `lorafit validate` too.
Under torchrun rank 0 packs and the other ranks wait (concurrent writers would race); across nodes without a
shared file system, pack on each node first with `lorafit data pack`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lorafit.atomic import write_atomic
from lorafit.config.context import current_context
from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.console import info, is_main_rank
from lorafit.data.cache_dir import default_dataset_prefix
from lorafit.data.records import RecordSource, check_local
from lorafit.data.token_files import PackedTokens, pack_file, resolve_prefix
from lorafit.datasets.packed import InstructionDataset, PackedDataset, PackedInstructionDataset
from lorafit.distributed.env import current_env
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
    sample, each attending only to itself, never one split over two blocks; lorafit.data.blocks); false gives
    one padded sample each. `too_long` (packing only): a conversation longer than a block is dropped (default:
    a cut answer would train the model to stop mid-answer, or never to stop) or truncated; both are reported.
    """

    path: str
    tokenizer: Component("tokenizer")
    cache_path: str | None = None
    sequence_length: int | None = Field(None, ge=1)
    packing: bool = False
    too_long: Literal["drop", "truncate"] = "drop"
    format: Literal["auto", "instruction", "messages", "prompt_response", "sharegpt", "alpaca"] = "auto"
    columns: dict[str, str] | None = None


CACHE_MARK = "lorafit dataset cache"  # in every stamp the cache writes: what proves the files are its own
_CACHE_SUFFIXES = (".bin", ".mask.bin", ".json", ".source.json")


def _file(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What decides the tokens: the whole tokenizer definition (tokenizer.json) with its special tokens, and the
    chat template (rendered conversations), each as a sha256."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    template = getattr(tokenizer, "chat_template", None)
    return {
        "tokenizer_sha256": _sha256(definition + json.dumps(special)),
        "vocab_size": len(tokenizer),
        "chat_template_sha256": _sha256(json.dumps(template, sort_keys=True)) if template else None,
    }


def _fingerprint(source: Path, tokenizer: Any, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "written_by": CACHE_MARK,
        "source_path": str(source.resolve()),
        **spec,
        "content_sha256": RecordSource(source, spec.get("split")).fingerprint(),
        **tokenizer_fingerprint(tokenizer),
    }


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
    write_atomic(_file(prefix, ".source.json"), json.dumps(stamp))


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
        why = (
            f"they are a `lorafit data pack` output of {index['source'].get('path')}"
            if packed
            else "lorafit did not write them"
        )
    names = ", ".join(p.name for p in existing)
    raise UserError(
        f"{prefix} holds {names}, which the dataset cache may not replace ({why}); choose another "
        f"cache_path (or delete those files yourself)",
        field="cache_path",
    )


def ensure_packed(source: Path, tokenizer: Any, prefix: Path, spec: dict[str, Any]) -> Path:
    """`prefix`, packed from `source` unless an up-to-date cache is already there.

    Under torchrun, rank 0 packs while the other ranks wait for it (one writer, no race); every rank then
    checks that it sees the cache, which fails clearly on nodes without a shared file system.
    """
    env = current_env()
    env.on_main(_pack_if_stale, source, tokenizer, prefix, spec)  # a UserError on rank 0 stops every rank
    if env.world_size > 1 and not _is_fresh(source, tokenizer, prefix, spec):
        raise UserError(
            f"rank {env.rank} cannot see {prefix}.json that rank 0 wrote (no shared file system?); without "
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


def _is_fresh(source: Path, tokenizer: Any, prefix: Path, spec: dict[str, Any]) -> bool:
    stamp = _read_json(_file(prefix, ".source.json"))
    if not (_file(prefix, ".json").is_file() and isinstance(stamp, dict)):
        return False  # no stamp, or a damaged one: pack again (if the files are ours)
    recorded = {k: v for k, v in stamp.items() if k != "index"}
    return stamp.get("index") == _index_stat(prefix) and recorded == _fingerprint(source, tokenizer, spec)


def _pack_if_stale(source: Path, tokenizer: Any, prefix: Path, spec: dict[str, Any]) -> Path:
    if _is_fresh(source, tokenizer, prefix, spec):
        return prefix
    check_cache_owner(source, prefix)
    info(f"tokenizing {source} into {prefix}.bin (cached for later runs)")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        # claim the prefix before writing: a pack interrupted from here on still leaves files known to be ours
        _write_stamp(prefix, {"written_by": CACHE_MARK, "source_path": str(source.resolve()), "state": "packing"})
        pack_file(
            source,
            tokenizer,
            prefix,
            jsonl_field=spec.get("text_field") or "text",
            fmt=spec["format"],
            columns=spec.get("columns"),
            split=spec.get("split"),
            overwrite=True,
            progress=is_main_rank(),
            replace_checked=True,
        )
        _write_stamp(prefix, {**_fingerprint(source, tokenizer, spec), "index": _index_stat(prefix)})
    except OSError as error:  # a read-only or full cache location: the user's to change, named by its YAML key
        reason = describe_storage_error(error) if storage_error(error) else str(error)
        raise UserError(f"cannot write the dataset cache {prefix}: {reason}", field="cache_path") from None
    return prefix


def cache_prefix(source: Path, cache_path: str | None, suffix: str) -> Path:
    """`cache_path`, else a prefix in lorafit's own cache folder (lorafit.data.cache_dir), never beside the data."""
    return resolve_prefix(cache_path) if cache_path else default_dataset_prefix(source, suffix)


def build_cached(source: Path, tokenizer: Any, prefix: Path, spec: dict[str, Any], make: Any) -> Any:
    """`make(prefix)` over the cache of `source` (packed first when stale); under `lorafit validate` only the
    cache path is checked and nothing is tokenized."""
    if not current_context().load_weights:
        check_cache_owner(source, prefix)
        # what an earlier run packed there, if it is still this source with this tokenizer (validate's counts); a
        # stale cache (another tokenizer, changed data) is re-tokenized by `run`, so nothing is read from it here
        fresh = _is_fresh(source, tokenizer, prefix, spec)
        index = _read_json(_file(prefix, ".json")) if fresh else None
        dataset = make(prefix, index.get("kind") if isinstance(index, dict) else None)
        dataset.cache_is_stale = not fresh
        return dataset
    prefix = ensure_packed(source, tokenizer, prefix, spec)
    dataset = make(prefix, PackedTokens(prefix).kind)
    dataset.data  # noqa: B018 - opens and checks now rather than in the training loop
    return dataset


def _spec(config: RawTextConfig | RawInstructionConfig) -> dict[str, Any]:
    if isinstance(config, RawTextConfig):
        return {"format": "text", "text_field": config.jsonl_field, "columns": None, "split": None}
    return {
        "format": "instruction" if config.format == "auto" else config.format,
        "text_field": None,
        "columns": config.columns,
        "split": None,
    }


def _build(config: RawTextConfig | RawInstructionConfig, kind: str, make: Any) -> Any:
    source = check_local(Path(config.path), field="path")
    if not source.is_file():
        raise UserError(f"{source} is a folder: give a file, or read the folder with dataset/hf_datasets", field="path")
    prefix = cache_prefix(source, config.cache_path, kind)
    return build_cached(
        source, config.tokenizer, prefix, _spec(config), lambda prefix, _kind: make(prefix, config.sequence_length)
    )


@register_component("dataset", "text", RawTextConfig)
def build_text_dataset(config: RawTextConfig) -> PackedDataset:
    """Fixed-length blocks of a raw text file, tokenized into a cache on first use."""
    return _build(config, "text", PackedDataset)


@register_component("dataset", "jsonl_instruction", RawInstructionConfig)
def build_jsonl_instruction_dataset(config: RawInstructionConfig) -> InstructionDataset:
    """Conversations of a raw .jsonl file (any conversation format), tokenized into a cache on first use: one
    sample each, or (packing) bin-packed whole into blocks."""
    if config.packing:
        return _build(config, "instruction", lambda *a: PackedInstructionDataset(*a, too_long=config.too_long))
    return _build(config, "instruction", InstructionDataset)
