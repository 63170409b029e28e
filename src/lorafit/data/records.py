"""Where records come from: a `.txt` file's paragraphs, JSON Lines read line by line (errors name the line), or
a local file or folder read with Hugging Face `datasets` (JSON arrays, CSV, Parquet, Arrow, `save_to_disk`
folders; errors name the row). Nothing is downloaded: a name that is not a local path is refused.

Every source yields `(where, record, done)`: `where` names the file and line or row for errors, `done` moves the
progress bar (bytes for files read here, rows for `datasets`), out of `total`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorafit.data.cache_dir import cache_root
from lorafit.data.sources import is_jsonl, iter_jsonl_records, iter_text_documents
from lorafit.errors import UserError

DATASETS_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".json": "json",
                     ".jsonl": "json", ".ndjson": "json"}  # fmt: skip


def check_local(path: Path, field: str | None = None) -> Path:
    """`path` if it exists; a hub id or a missing file is a clear error (no downloads at run time)."""
    if path.exists():
        return path
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix:
        raise UserError(f"{text}: not a local file or folder. lorafit reads no dataset hub at run time; download it "
                        f"once (e.g. `datasets.load_dataset('{text}').save_to_disk('data/{path.name}')`) and give "
                        "that folder", field=field)  # fmt: skip
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
                raise UserError(f"{path}: unknown file type '{path.suffix}'; valid: .txt, "
                                f"{', '.join(sorted(DATASETS_SUFFIXES))} or a save_to_disk folder")  # fmt: skip
            extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            loaded = datasets.load_dataset(builder, data_files=str(path), split="train",
                                           cache_dir=str(cache_root() / "hf_datasets"), **extra)  # fmt: skip
    except UserError:
        raise
    # KeyError / TypeError: a save_to_disk folder whose state.json or dataset_info.json is damaged (only
    # datasets' own calls are in this block, so these are the files' fault, not lorafit's)
    except (FileNotFoundError, ValueError, OSError, KeyError, TypeError,
            datasets.exceptions.DatasetGenerationError) as e:  # fmt: skip
        cause = e.__cause__ or e
        raise UserError(f"{path}: cannot read it with `datasets`: {type(cause).__name__}: {cause}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise UserError(f"{path}: a saved dataset with splits {', '.join(splits)}; choose one with `split`"
                            + (f" ('{split}' is not one)" if split else ""), field="split")  # fmt: skip
        loaded = loaded[split]
    elif split not in (None, "train"):
        raise UserError(f"{path}: has no splits, so split '{split}' cannot be chosen", field="split")
    return loaded
