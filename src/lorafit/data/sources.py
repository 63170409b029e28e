"""Reading raw training data: plain text files and JSON Lines, with errors that name the file and line.

A `.txt` file holds documents separated by blank lines (paragraphs). A `.jsonl` file holds one JSON
object per line; blank lines are skipped. Every reader yields `(line_number, item, bytes_read)` so that
errors can say where and progress bars can say how far.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def text_field(record: dict[str, Any], field: str, where: str) -> str:
    """The document text of a JSONL record; a missing field says which fields the record does have."""
    if field not in record:
        fields = ", ".join(f"'{k}'" for k in record) or "none"
        raise UserError(f"{where}: no '{field}' field (the record's fields: {fields}); choose one with --jsonl_field")
    return check_string(record[field], where, f"field '{field}'")
