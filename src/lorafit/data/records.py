"""Where records come from, with errors that name the file and line (or row): a `.txt` file's paragraphs (documents
separated by blank lines), JSON Lines (one object per line, blank lines skipped), or a local file or folder read
with Hugging Face `datasets` (JSON arrays, CSV, Parquet, Arrow, `save_to_disk` folders). Nothing is downloaded: a
name that is not a local path is refused.

The file readers yield `(line_number, item, bytes_read)`; every `RecordSource` yields `(where, record, done)`:
`where` names the file and line or row for errors, `done` moves the progress bar (bytes for files read here, rows
for `datasets`), out of `total`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorafit.data.cache_dir import cache_root
from lorafit.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def json_type_name(value: Any) -> str:
    return "null" if value is None else _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def iter_lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(1-based line number, decoded line, bytes read so far); a line that is not UTF-8 is a UserError."""
    done = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            done += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{number}: not valid UTF-8 (byte {e.start + 1} of the line is {raw[e.start]:#04x}); "
                    "save the file as UTF-8"
                ) from None
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]  # a byte-order mark is not content
            yield number, text, done


def iter_text_documents(path: Path) -> Iterator[tuple[int, str, int]]:
    """Documents of a plain text file: runs of non-blank lines, separated by blank lines."""
    lines: list[str] = []
    first = 0
    done = 0
    for number, text, done in iter_lines(path):
        if text.strip():
            if not lines:
                first = number
            lines.append(text.rstrip("\r\n"))
        elif lines:
            yield first, "\n".join(lines), done
            lines = []
    if lines:
        yield first, "\n".join(lines), done


def iter_jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any], int]]:
    """JSON objects, one per non-blank line."""
    for number, text, done in iter_lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            reason = e.msg.removesuffix(" at")  # "Invalid control character at": the column follows
            raise UserError(f"{path}:{number}: not valid JSON ({reason} at column {e.colno})") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line, got {json_type_name(record)}")
        yield number, record, done


def check_string(value: Any, where: str, what: str) -> str:
    """`value` as a string that can be encoded (JSON allows lone surrogate escapes; tokenizers do not)."""
    if not isinstance(value, str):
        raise UserError(f"{where}: {what} must be a string, got {json_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: {what} contains an unpaired surrogate escape (\\ud800-\\udfff)") from None
    return value


DATASETS_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
}


def check_local(path: Path, field: str | None = None) -> Path:
    """`path` if it exists; a hub id or a missing file is a clear error (no downloads at run time)."""
    if path.exists():
        return path
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix:
        raise UserError(
            f"{text}: not a local file or folder. lorafit reads no dataset hub at run time; download it "
            f"once (e.g. `datasets.load_dataset('{text}').save_to_disk('data/{path.name}')`) and give "
            "that folder",
            field=field,
        )
    raise UserError(f"{'input ' if field is None else ''}file not found: {path}", field=field)


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def uses_datasets(path: Path) -> bool:
    """Whether `path` is read with `datasets` (everything but .txt and JSON Lines)."""
    if path.is_dir():
        return True
    if is_jsonl(path):
        return path.suffix.lower() == ".json" and _is_json_array(path)
    return path.suffix.lower() in DATASETS_SUFFIXES


class RecordSource:
    """The records of one local file or folder; `split` picks one of a saved DatasetDict's splits."""

    def __init__(self, path: str | os.PathLike, split: str | None = None):
        self.path = check_local(Path(path))
        self.split = split
        self.hf = uses_datasets(self.path)
        if not self.hf and not self.path.is_file():
            raise UserError(f"{self.path} is not a file")
        self._dataset = None

    @property
    def is_text_file(self) -> bool:
        return not self.hf and not is_jsonl(self.path)

    @property
    def total(self) -> int:
        return len(self.dataset) if self.hf else (self.path.stat().st_size or 1)

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = load_local(self.path, self.split)
        return self._dataset

    def records(self) -> Iterator[tuple[str, dict[str, Any], int]]:
        if not self.hf:
            for number, record, done in iter_jsonl_records(self.path):
                yield f"{self.path}:{number}", record, done
            return
        row_name = "line" if self.path.suffix.lower() in (".csv", ".tsv") else "row"
        for i, record in enumerate(self.dataset):
            where = f"{self.path}: {row_name} {i + 2}" if row_name == "line" else f"{self.path}: row {i + 1}"
            yield where, record, i + 1

    def text_documents(self) -> Iterator[tuple[str, str, int]]:
        """A .txt file's paragraphs."""
        for number, text, done in iter_text_documents(self.path):
            yield f"{self.path}:{number}", text, done

    def fingerprint(self) -> str:
        """sha256 of the content (every file of a folder, with its relative path): the cache key of the data."""
        digest = hashlib.sha256()
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        for file in files:
            digest.update(str(file.relative_to(self.path) if self.path.is_dir() else "").encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        digest.update(f"split={self.split}".encode())
        return digest.hexdigest()


def load_local(path: Path, split: str | None):
    """A `datasets.Dataset` from a local file (by suffix) or a `save_to_disk` folder, without network access."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of lorafit; a broken install
        raise UserError(f"{path}: reading it needs the `datasets` package (pip install datasets)") from None
    with _offline(datasets.config), _no_progress_bars(datasets):
        return _load_local(datasets, path, split)


@contextmanager
def _no_progress_bars(datasets: Any) -> Iterator[None]:
    """No "Generating train split" bars (lorafit's own bar counts the rows), for this call only."""
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


@contextmanager
def _offline(config: Any) -> Iterator[None]:
    """`datasets` offline for this call only (its flags, read from HF_DATASETS_OFFLINE when it was imported), as
    they were afterwards: neither the process environment nor the caller's later use of `datasets` changes."""
    names = [n for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(config, n)]
    was = {n: getattr(config, n) for n in names}
    for name in names:
        setattr(config, name, True)
    try:
        yield
    finally:
        for name, value in was.items():
            setattr(config, name, value)


def _load_local(datasets: Any, path: Path, split: str | None):
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:
            builder = DATASETS_SUFFIXES.get(path.suffix.lower())
            if builder is None:
                raise UserError(
                    f"{path}: unknown file type '{path.suffix}'; valid: .txt, "
                    f"{', '.join(sorted(DATASETS_SUFFIXES))} or a save_to_disk folder"
                )
            extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            loaded = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=str(cache_root() / "hf_datasets"), **extra
            )
    except UserError:
        raise
    # KeyError / TypeError: a save_to_disk folder whose state.json or dataset_info.json is damaged (only
    # datasets' own calls are in this block, so these are the files' fault, not lorafit's)
    except (
        FileNotFoundError,
        ValueError,
        OSError,
        KeyError,
        TypeError,
        datasets.exceptions.DatasetGenerationError,
    ) as e:
        cause = e.__cause__ or e
        raise UserError(f"{path}: cannot read it with `datasets`: {type(cause).__name__}: {cause}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise UserError(
                f"{path}: a saved dataset with splits {', '.join(splits)}; choose one with `split`"
                + (f" ('{split}' is not one)" if split else ""),
                field="split",
            )
        loaded = loaded[split]
    elif split not in (None, "train"):
        raise UserError(f"{path}: has no splits, so split '{split}' cannot be chosen", field="split")
    return loaded
