"""`lorafit data create_raw_index` and `lorafit data pack_encoded_data`: Modalities' data tools, same files.

`create_raw_index SRC [--index_path P]` writes P (default: SRC with suffix .idx): the pickled list of
(byte offset, byte length) of every JSONL line, each checked to be valid JSON, as Modalities writes it.

`pack_encoded_data CONFIG` takes Modalities' data-preparation config as written:

    settings:
      src_path: data/chat/train.jsonl
      dst_path: data/chat/train.pbin       # default: next to src_path
      index_path: data/chat/train.idx      # default: src_path with suffix .idx
      jq_pattern: .chat                    # what to tokenize from each line (a jq program; the first result)
      num_cpus: 4                          # tokenizing workers (see below)
      eod_token: <|endoftext|>             # appended to every document
      processing_batch_size: 10            # lines per tokenizer call
      raw_samples_queue_size: 300          # Modalities' queue sizes: no effect here (no queues)
      processed_samples_queue_size: 300
      sequence_length: 2048                # no effect of its own; referenced as ${settings.sequence_length}
    tokenizer: {component_key: tokenizer, variant_key: pretrained_hf_tokenizer, config: {...}}

Each line: jq_pattern's first result is tokenized with the tokenizer's padding / truncation / max_length, and
eod_token is appended, by the rule of the Modalities release asked for (`--modalities_release`): modalities 0.5.0,
the default, skips it when the tokens already end with it (a document padded with it); the `lora` branch always
appends it. Tokens are written as 1, 2 or 4 bytes each (from the vocabulary size) in a `.pbin` file.
lorafit tokenizes in one process with the fast tokenizer's own threads (`num_cpus` of them); Modalities uses
num_cpus worker processes. The output is the same bytes.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafit.atomic import write_atomic
from lorafit.components import load_builtin_components as load
from lorafit.config.graph import ConfigGraph, pydantic_problems
from lorafit.config.loader import load_config
from lorafit.console import info, warn
from lorafit.data.pbin import looks_like_pbin, read_raw_index, token_size_for, write_pbin
from lorafit.errors import ConfigError, UserError
from lorafit.modalities.tokenizer import ModalitiesTokenizer


def create_raw_index(src_path: Path, index_path: Path | None = None) -> Path:
    """Index every line of a JSONL file: (byte offset, byte length without the newline). Never overwrites."""
    src_path = Path(src_path)
    index_path = Path(index_path) if index_path else src_path.with_suffix(".idx")
    if src_path.is_dir():
        raise UserError(f"{src_path} is a folder; create_raw_index indexes one JSONL file")
    if src_path.exists() and not src_path.is_file():  # a FIFO or a device: read once, it could not be indexed
        raise UserError(f"{src_path} is not a regular file (a pipe or a device); index a JSONL file on disk")
    if not src_path.is_file():
        raise UserError(f"JSONL file not found: {src_path}")
    if index_path.exists():
        raise UserError(f"the index {index_path} already exists: delete it or give another --index_path")
    entries: list[tuple[int, int]] = []
    offset = 0
    with src_path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            body = line[:-1] if line.endswith(b"\n") else line
            try:
                json.loads(body)
            except ValueError as e:
                raise UserError(
                    f"{src_path}, line {number}: not valid JSON ({e}); Modalities' index accepts only JSON lines"
                ) from None
            entries.append((offset, len(body)))
            offset += len(line)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(index_path, pickle.dumps(entries))
    return index_path


class PackSettings(BaseModel):
    """The `settings` block of Modalities' data-preparation config (`PackedDatasetSettings`)."""

    model_config = ConfigDict(extra="forbid")

    src_path: Path
    dst_path: Path | None = None
    index_path: Path | None = None
    jq_pattern: str
    num_cpus: int = Field(os.cpu_count() or 1, ge=1)
    eod_token: str
    processing_batch_size: int = Field(ge=1)
    raw_samples_queue_size: int = Field(ge=1)
    processed_samples_queue_size: int = Field(ge=1)
    sequence_length: int | None = None  # only a value for interpolation (max_length: ${settings.sequence_length})


def pack_encoded_data(
    config_path: Path, *, overrides: tuple[str, ...] = (), overwrite: bool = False, release: str = "0.5.0"
) -> Path:
    """Tokenize the indexed JSONL file that a Modalities data-preparation config names into a `.pbin` file, the
    bytes `release`'s `pack_encoded_data` writes: "0.5.0" (the current release) appends eod_token only to a
    document that does not already end with it (a document padded with it, say); "lora_branch" always appends."""
    if release not in RELEASE_RULES:
        raise UserError(f"--modalities_release {release!r}: valid: {', '.join(RELEASE_RULES)}")

    load_builtin_components()
    config = load_config(Path(config_path), overrides=overrides)
    unknown = sorted(set(config) - {"settings", "tokenizer"})
    if unknown:
        raise ConfigError(
            f"unknown top-level key '{unknown[0]}'; a data-preparation config holds settings and tokenizer",
            field=unknown[0],
        )
    try:
        settings = PackSettings.model_validate(config.get("settings") or {})
    except ValidationError as e:
        raise ConfigError("", problems=pydantic_problems(e, "settings", PackSettings)) from None
    if "tokenizer" not in config:
        raise ConfigError("a data-preparation config needs a top-level 'tokenizer' component", field="tokenizer")
    graph = ConfigGraph(config)
    problems = graph.check(["tokenizer"])
    if problems:
        raise ConfigError("", problems=problems)
    tokenizer = graph.build("tokenizer")
    if not isinstance(tokenizer, ModalitiesTokenizer):
        raise ConfigError(
            "expected tokenizer/pretrained_hf_tokenizer (Modalities' tokenizer, which knows padding and truncation)",
            field="tokenizer.variant_key",
        )
    src = settings.src_path
    if not src.is_file():
        raise ConfigError(f"file not found: {src}", field="settings.src_path")
    dst = settings.dst_path or src.with_suffix(".pbin")
    index_path = settings.index_path or src.with_suffix(".idx")
    if not index_path.is_file():
        raise ConfigError(
            f"index not found: {index_path}; make it with `lorafit data create_raw_index {src}`",
            field="settings.index_path",
        )
    _check_output(dst, {"settings.src_path": src, "settings.index_path": index_path}, overwrite)
    index = read_raw_index(index_path)
    _check_index_matches(index, src, index_path)
    try:
        eod = tokenizer.get_token_id(settings.eod_token)
    except UserError as e:
        raise e.prefixed("settings.eod_token") from None
    program = _compile_jq(settings.jq_pattern)
    token_size = token_size_for(tokenizer.vocab_size)
    os.environ.setdefault("RAYON_NUM_THREADS", str(settings.num_cpus))  # the fast tokenizer's worker threads
    documents = _documents(src, index, program, tokenizer, eod, settings.processing_batch_size, release)
    dst.parent.mkdir(parents=True, exist_ok=True)
    count = write_pbin(dst, documents, token_size)
    info(f"packed {count:,} documents from {src} into {dst} ({token_size} bytes per token)")
    return dst


def _check_output(dst: Path, inputs: dict[str, Path], overwrite: bool) -> None:
    """settings.dst_path may replace (with --overwrite) only an earlier .pbin, never an input of this very run."""
    for key, path in inputs.items():
        if dst.resolve() == path.resolve():
            raise ConfigError(
                f"{dst} is also {key}: packing would replace its own input; choose another dst_path",
                field="settings.dst_path",
            )
    if not (dst.exists() or dst.is_symlink()):
        return
    if not overwrite:
        raise UserError(f"{dst} already exists (settings.dst_path): delete it, or pass --overwrite")
    if dst.is_symlink() or not dst.is_file() or not looks_like_pbin(dst):
        raise ConfigError(
            f"{dst} exists and is not a .pbin file, so --overwrite does not replace it; choose another dst_path",
            field="settings.dst_path",
        )


def _check_index_matches(index, src: Path, index_path: Path) -> None:
    """The index must describe SRC as it is now: every entry one whole line, in order, and every line left out
    one that is not JSON (Modalities' `drop_faulty_entries`). Lines appended after `create_raw_index`, or the
    index of another file, would otherwise be packed wrong or not at all, without a word. Streamed: two one-byte
    reads per entry, and the lines between entries (those left out) read whole."""
    size = src.stat().st_size
    problem, expected = None, 0  # expected: where the next unread line starts
    with src.open("rb") as f:
        for number, (start, length) in enumerate(index.tolist(), start=1):
            end = start + length
            f.seek(max(start - 1, 0))
            before = f.read(1) if start else b"\n"
            f.seek(end)
            if start < expected or end > size or before != b"\n" or f.read(1) not in (b"\n", b""):
                problem = f"entry {number} (bytes {start}-{end}) is not a whole line of the file"
                break
            if _json_line_between(f, expected, start):
                problem = f"a JSON line before entry {number} is not indexed"
                break
            expected = end + 1
        else:
            if _json_line_between(f, expected, size):
                problem = "a JSON line after the last indexed line is not indexed"
    if problem:
        raise ConfigError(
            f"the index {index_path} does not match {src}: {problem}; was the file changed after "
            f"the index was made? Remake it: delete {index_path} and run "
            f"`lorafit data create_raw_index {src}`",
            field="settings.index_path",
        )


def _json_line_between(f, start: int, stop: int) -> bool:
    """Whether any line of the file between byte `start` and `stop` is JSON (read line by line)."""
    f.seek(start)
    while f.tell() < stop:
        line = f.readline(stop - f.tell())
        if _is_json(line.rstrip(b"\r\n")):
            return True
    return False


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def load_builtin_components() -> None:
    load()


def _compile_jq(pattern: str) -> Any:
    import jq

    try:
        return jq.compile(pattern)
    except ValueError as e:
        raise ConfigError(f"invalid jq program {pattern!r}: {str(e).strip()}", field="settings.jq_pattern") from None


def _documents(src: Path, index, program, tokenizer, eod: int, batch_size: int, release: str):
    """Token lists, one per indexed line, EOD appended; texts tokenized `batch_size` at a time."""
    with src.open("rb") as f:
        data = f.read() if src.stat().st_size < 2**31 else None

        def line(start: int, length: int) -> str:
            if data is not None:
                return data[start : start + length].decode("utf-8")
            f.seek(start)
            return f.read(length).decode("utf-8")

        texts: list[str] = []
        for number, (start, length) in enumerate(index.tolist(), start=1):
            try:
                value = program.input_text(line(start, length)).first()
            except (ValueError, StopIteration) as e:
                raise UserError(f"{src}, line {number}: the jq program found nothing ({e})") from None
            if not isinstance(value, str):
                raise UserError(
                    f"{src}, line {number}: the jq program gives {type(value).__name__} "
                    f"{str(value)[:60]!r}, not a text to tokenize (settings.jq_pattern)"
                )
            texts.append(value)
            if len(texts) == batch_size:
                yield from _tokenized(texts, tokenizer, eod, src, release)
                texts = []
        yield from _tokenized(texts, tokenizer, eod, src, release)


RELEASE_RULES = {
    "0.5.0": "eod_token appended unless the document ends with it",
    "lora_branch": "eod_token always appended",
}


def _tokenized(texts: list[str], tokenizer, eod: int, src: Path, release: str):
    if not texts:
        return
    if tokenizer.padding in (True, "longest"):  # padding to the longest of a batch: one text at a time, as Modalities
        encoded = [tokenizer.tokenize(text) for text in texts]
    else:
        encoded = tokenizer.tokenizer(
            texts, max_length=tokenizer.max_length, padding=tokenizer.padding, truncation=tokenizer.truncation
        )["input_ids"]
    for tokens in encoded:
        if not tokens:
            warn(f"{src}: an empty document is left out (as Modalities does)")
            continue
        yield list(tokens) if release == "0.5.0" and tokens[-1] == eod else [*tokens, eod]
