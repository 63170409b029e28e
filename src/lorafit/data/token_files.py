"""Tokenize a raw file into a packed token file, and read one back.

Files for an output prefix P (all written to temporary names, then renamed; `P.json` last, so a file set
without its `.json` is an interrupted write and is never read):

- `P.bin`: every token, back to back (np.uint16 when the vocabulary fits, else np.uint32), memory-mapped.
- `P.mask.bin`: instruction data only, one uint8 per token: 1 = train on this token (assistant answers).
- `P.json`: `format_version`, `kind` ("text" | "instruction"), `dtype`, `num_tokens`, `num_documents`,
  `document_offsets` (num_documents + 1 token offsets: document i is tokens[offsets[i]:offsets[i + 1]]),
  `num_trained_tokens`, `has_mask`, `tokenizer` {name_or_path, vocab_size, eos_token_id, pad_token_id,
  bos_token_id}, `source` {path, bytes, jsonl_field}, `skipped_empty_documents`.

Text (a `.txt` file's paragraphs, or a JSONL text field): each document tokenized with the tokenizer's own
special tokens (e.g. Llama's BOS) and closed with EOS, so documents are joined by EOS. Instruction JSONL:
see `lorafit.data.chat`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorafit.atomic import remove_abandoned, staging_path
from lorafit.console import info
from lorafit.data.chat import render_with_mask
from lorafit.data.chat_templates import default_system_prompt
from lorafit.data.formats import FormatReader, kind_of
from lorafit.data.records import RecordSource
from lorafit.errors import UserError

FORMAT_VERSION = 1
_TEXT_BATCH = 256  # documents per tokenizer call: batching is what makes fast tokenizers fast


def resolve_prefix(path: str | os.PathLike) -> Path:
    """`out/data`, `out/data.bin` and `out/data.json` all name the prefix `out/data`."""
    path = Path(path)
    for suffix in (".mask.bin", ".bin", ".json"):
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def _paths(prefix: Path) -> dict[str, Path]:
    return {name: prefix.with_name(prefix.name + name) for name in (".bin", ".mask.bin", ".json")}


@dataclass(frozen=True)
class PackedInfo:
    """What `pack_file` wrote."""

    prefix: Path
    kind: str
    num_tokens: int
    num_documents: int
    num_trained_tokens: int
    dtype: str
    vocab_size: int
    skipped_empty_documents: int = 0
    format: str = ""

    @property
    def bin_path(self) -> Path:
        return _paths(self.prefix)[".bin"]

    @property
    def meta_path(self) -> Path:
        return _paths(self.prefix)[".json"]

    @property
    def mask_path(self) -> Path | None:
        return _paths(self.prefix)[".mask.bin"] if self.kind == "instruction" else None


def is_pack_index(path: Path) -> bool:
    """Whether `path` is a `.json` index that `pack_file` wrote (and not, say, the user's own JSON file)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"format_version", "kind", "document_offsets", "source"} <= meta.keys()


def check_replaceable(prefix: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an earlier pack output (with `overwrite`): a user's own `corpus.bin`
    or `corpus.json` at the prefix is never replaced, even with --overwrite."""
    existing = [p for p in _paths(prefix).values() if p.exists() or p.is_symlink()]
    if not existing:
        return
    if not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite (overwrite=True) to replace it")
    index = _paths(prefix)[".json"]
    if not is_pack_index(index):
        names = ", ".join(str(p) for p in existing)
        raise UserError(
            f"--output {prefix}: {names} exist and are not an earlier `lorafit data pack` output "
            f"(no pack index {index.name}), so --overwrite does not replace them; choose another --output"
        )


class _Writer:
    """Appends tokens (and mask) to temporary files; `commit` renames them into place, `abort` removes them."""

    def __init__(self, prefix: Path, dtype: np.dtype, with_mask: bool):
        self.final = _paths(prefix)
        for path in self.final.values():
            remove_abandoned(path)
        self.temp = {k: staging_path(p) for k, p in self.final.items()}
        self.dtype = dtype
        self.limit = np.iinfo(dtype).max
        # closed by commit() or abort(), which pack_file always reaches
        self.files = {".bin": open(self.temp[".bin"], "wb")}  # noqa: SIM115
        if with_mask:
            self.files[".mask.bin"] = open(self.temp[".mask.bin"], "wb")  # noqa: SIM115
        self.offsets = [0]
        self.trained = 0

    def add(self, ids: list[int], mask: list[int] | None = None) -> None:
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() > self.limit):
            raise ValueError(f"token id out of range for {self.dtype}: {array.min()}..{array.max()}")
        self.files[".bin"].write(array.astype(self.dtype).tobytes())
        if ".mask.bin" in self.files:
            bits = np.asarray(mask, dtype=np.uint8)
            self.files[".mask.bin"].write(bits.tobytes())
            self.trained += int(bits.sum())
        else:
            self.trained += len(ids)
        self.offsets.append(self.offsets[-1] + len(ids))

    def commit(self, meta: dict[str, Any]) -> None:
        for f in self.files.values():
            f.close()
        with open(self.temp[".json"], "w", encoding="utf-8") as f:
            json.dump(meta, f)
        # the old .json goes first: a crash in between leaves no .json, never a .json beside another .bin
        self.final[".json"].unlink(missing_ok=True)
        os.replace(self.temp[".bin"], self.final[".bin"])
        if ".mask.bin" in self.files:
            os.replace(self.temp[".mask.bin"], self.final[".mask.bin"])
        else:
            self.final[".mask.bin"].unlink(missing_ok=True)  # stale mask of an earlier instruction pack
        os.replace(self.temp[".json"], self.final[".json"])

    def abort(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):  # closing flushes: under a full disk that fails again
                f.close()
        for path in self.temp.values():
            path.unlink(missing_ok=True)


def _pack_text(documents: Iterator[tuple[str, str, int]], tokenizer, writer: _Writer, advance) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos_token, so packed documents cannot be separated")
    skipped = 0

    def flush(batch: list[str]) -> int:
        empty = 0
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            ids = list(ids)
            if not ids:
                empty += 1
                continue
            writer.add(ids if ids[-1] == eos else [*ids, eos])
        return empty

    batch: list[str] = []
    for _, text, done in documents:
        if text:
            batch.append(text)
        else:
            skipped += 1
        if len(batch) >= _TEXT_BATCH:
            skipped += flush(batch)
            batch = []
            advance(done)
    if batch:
        skipped += flush(batch)
    return skipped


def _pack_instruction(records, reader: FormatReader, tokenizer, writer: _Writer, advance) -> int:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(no_template_message(tokenizer))
    without_system = 0
    for where, record, done in records:
        messages = reader.messages(record, where)
        without_system += messages[0]["role"] != "system"
        ids, mask = render_with_mask(tokenizer, messages, where)
        writer.add(ids, mask)
        advance(done)
    say_default_system_prompt(tokenizer, without_system)
    return 0


def no_template_message(tokenizer) -> str:
    return (
        f"conversations need a chat template, and the tokenizer ({tokenizer.name_or_path}) has none: name one "
        "with the tokenizer's chat_template (chatml, llama3, plain for a base model, or a Jinja file; "
        "--chat_template on the command line)"
    )


def say_default_system_prompt(tokenizer, without_system: int) -> None:
    """A template's own system prompt changes what is trained: say so, with the text, when it was added."""
    default = default_system_prompt(tokenizer) if without_system else None
    if default:
        shown = default if len(default) <= 120 else default[:117] + "..."
        info(
            f"the chat template adds its default system prompt {shown!r} to the {without_system:,} conversations "
            "without a system message (give them one, or choose another template with the tokenizer's "
            "chat_template)"
        )


def open_records(source: RecordSource, reader: FormatReader):
    """(the format, the records from the first on); an empty source is an error."""
    if source.is_text_file:
        if reader.requested not in ("auto", "text"):
            raise UserError(
                f"{source.path}: a .txt file is plain text; format '{reader.requested}' needs JSON Lines "
                "or a table (one record per line or row)"
            )
        reader.fmt, reader.detected = "text", "a .txt file"
        return "text", source.text_documents()
    records = source.records()
    first = next(records, None)
    if first is None:
        raise UserError(f"{source.path}: no documents (the file is empty or has only blank lines)")
    fmt = reader.resolve(first[1], first[0])
    rest = itertools.chain([first], records)
    if fmt == "text":
        return fmt, ((where, reader.text(record, where), done) for where, record, done in rest)
    return fmt, rest


def pack_file(
    input_path: str | os.PathLike,
    tokenizer,
    output_prefix: str | os.PathLike,
    *,
    jsonl_field: str = "text",
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    split: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    replace_checked: bool = False,
) -> PackedInfo:
    """Tokenize `input_path` into `<prefix>.bin/.json` (+ mask): a .txt file, JSON Lines, or a local file or
    folder `datasets` reads (lorafit.data.records), in any format of lorafit.data.formats.

    `overwrite` replaces an earlier pack output only (see `check_replaceable`); `replace_checked` is for a
    caller that has already made sure the files at the prefix are its own (the dataset cache).
    """
    source = RecordSource(input_path, split)
    prefix = resolve_prefix(output_prefix)
    if not replace_checked:
        check_replaceable(prefix, overwrite)
    reader = FormatReader(fmt, jsonl_field, columns)
    fmt, documents = open_records(source, reader)
    kind = kind_of(fmt)
    vocab_size = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(prefix, dtype, with_mask=kind == "instruction")
    try:
        with _progress_bar(source, progress) as advance:
            if kind == "instruction":
                skipped = _pack_instruction(documents, reader, tokenizer, writer, advance)
            else:
                skipped = _pack_text(documents, tokenizer, writer, advance)
        if len(writer.offsets) == 1:
            raise UserError(f"{source.path}: no documents (the file is empty or has only blank lines)")
        info(f"{source.path}: format {reader.describe()}")
        packed = PackedInfo(
            prefix,
            kind,
            writer.offsets[-1],
            len(writer.offsets) - 1,
            writer.trained,
            dtype.name,
            vocab_size,
            skipped,
            fmt,
        )
        writer.commit(_meta(packed, writer.offsets, tokenizer, source.path, jsonl_field if kind == "text" else None))
    except BaseException:
        writer.abort()
        raise
    return packed


def _meta(info: PackedInfo, offsets: list[int], tokenizer, source: Path, jsonl_field: str | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "kind": info.kind,
        "dtype": info.dtype,
        "num_tokens": info.num_tokens,
        "num_documents": info.num_documents,
        "num_trained_tokens": info.num_trained_tokens,
        "has_mask": info.kind == "instruction",
        "skipped_empty_documents": info.skipped_empty_documents,
        "format": info.format,
        "tokenizer": {
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": info.vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        "source": {"path": str(source), "bytes": source.stat().st_size, "jsonl_field": jsonl_field},
        "document_offsets": offsets,
    }


@contextlib.contextmanager
def _progress_bar(source: RecordSource, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over the input's bytes (or rows); the yielded `advance(done)` moves it."""
    if not enabled:
        yield lambda done: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = source.total
    amount = MofNCompleteColumn() if source.hf else DownloadColumn()
    columns = (TextColumn("tokenizing {task.description}"), BarColumn(), amount, TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(source.path.name, total=total)
        yield lambda done: bar.update(task, completed=done)
        bar.update(task, completed=total)


class PackedTokens:
    """A packed token file opened for reading: `tokens` (memmap), `mask` (memmap or None), `offsets`, `meta`."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = resolve_prefix(prefix)
        paths = _paths(self.prefix)
        if not paths[".json"].is_file():
            hint = " (the .bin is there: an interrupted write?)" if paths[".bin"].exists() else ""
            raise UserError(f"{paths['.json']} not found{hint}: pack the data first with `lorafit data pack`")
        try:
            self.meta: dict[str, Any] = json.loads(paths[".json"].read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{paths['.json']}: not a packed-data index ({e})") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{paths['.json']}: format_version {self.meta.get('format_version')!r}, expected "
                f"{FORMAT_VERSION}; pack the data again"
            )
        self.dtype = np.dtype(self.meta["dtype"])
        self.num_tokens = int(self.meta["num_tokens"])
        self.tokens = self._map(paths[".bin"], self.dtype)
        self.mask = self._map(paths[".mask.bin"], np.dtype(np.uint8)) if self.meta["has_mask"] else None
        self.offsets = np.asarray(self.meta["document_offsets"], dtype=np.int64)

    def _map(self, path: Path, dtype: np.dtype) -> np.ndarray:
        if not path.is_file():
            raise UserError(f"{path} not found (named by {self.prefix}.json); pack the data again")
        expected = self.num_tokens * dtype.itemsize
        if path.stat().st_size != expected:
            raise UserError(f"{path} holds {path.stat().st_size} bytes, its index says {expected}; pack the data again")
        return np.memmap(path, dtype=dtype, mode="r", shape=(self.num_tokens,))

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad token, else its EOS, else 0 (padded positions are never attended nor trained)."""
        tok = self.meta["tokenizer"]
        for key in ("pad_token_id", "eos_token_id"):
            if tok.get(key) is not None:
                return int(tok[key])
        return 0

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids of document i and its mask (None for text data: every token is trained)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[start:end], None if self.mask is None else self.mask[start:end]

    def __len__(self) -> int:
        return self.num_tokens
