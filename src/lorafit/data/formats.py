"""Record formats: which one a file uses, and each record as plain text or as a conversation.

| format | a record | becomes |
|---|---|---|
| `text` | `{"text": "..."}` (the field `text_field` names) | a document trained on every token |
| `messages` | OpenAI: `{"messages": [{"role", "content"}, ...]}` | the conversation |
| `prompt_response` | `{"prompt", "response"[, "system"]}` | system?, user, assistant |
| `sharegpt` | `{"conversations": [{"from": "human"/"gpt"/"system", "value"}, ...][, "system"]}` | the conversation |
| `alpaca` | `{"instruction", "input"?, "output"[, "system"]}` | user: instruction (+ input); assistant: output |

`columns` maps a format's field to the record's own name for it (`{prompt: question, response: answer}`), for
files whose fields are named otherwise. `auto` detects the format from the first record: text, or conversations;
a file of conversations may mix the conversation formats (each record is read by its own keys), and the log
counts each. A record that fits no format, or not the one configured, is an error naming its file and line (or row).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

from lorafit.data.chat import conversation
from lorafit.data.records import check_string, json_type_name
from lorafit.errors import UserError

RecordFormat = Literal["auto", "text", "instruction", "messages", "prompt_response", "sharegpt", "alpaca"]
FORMATS: tuple[str, ...] = ("auto", "text", "instruction", "messages", "prompt_response", "sharegpt", "alpaca")
INSTRUCTION_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_response")
# ShareGPT speakers -> chat roles (the names used by ShareGPT dumps, Vicuna, SlimOrca, OpenHermes, LLaMA-Factory)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
}


def kind_of(fmt: str) -> str:
    """'text' or 'instruction' (what the packed file holds)."""
    return "text" if fmt == "text" else "instruction"


def apply_columns(record: dict[str, Any], columns: Mapping[str, str] | None, where: str) -> dict[str, Any]:
    """The record with its own field names replaced by the format's (columns: format field -> record field)."""
    if not columns:
        return record
    missing = [source for source in columns.values() if source not in record]
    if missing:
        fields = ", ".join(f"'{k}'" for k in record) or "none"
        raise UserError(f"{where}: no field '{missing[0]}' (named in columns; the record's fields: {fields})")
    renamed = {k: v for k, v in record.items() if k not in columns.values()}
    renamed.update({target: record[source] for target, source in columns.items()})
    return renamed


def detect(record: dict[str, Any], text_field: str) -> str | None:
    """The format a record is in, or None."""
    if text_field in record:
        return "text"
    for fmt in ("messages", "sharegpt", "alpaca", "prompt_response"):
        if _KEYS[fmt][0] in record:
            return fmt
    return None


class FormatReader:
    """Turns records into documents: `text(record, where)` or `messages(record, where)`, per the file's format.

    With `auto` (or `instruction`: any conversation format), the first record decides, and `detected` says how.
    """

    def __init__(self, fmt: str = "auto", text_field: str = "text", columns: Mapping[str, str] | None = None):
        if fmt not in FORMATS:
            raise UserError(f"unknown format '{fmt}'; valid: {', '.join(FORMATS)}")
        self.requested, self.text_field, self.columns = fmt, text_field, dict(columns or {})
        self.fmt: str | None = None if fmt in ("auto", "instruction") else fmt
        self.detected = ""
        self.counts: Counter[str] = Counter()  # conversation records read, by format

    @property
    def kind(self) -> str:
        return kind_of(self.fmt or "instruction")

    def resolve(self, record: dict[str, Any], where: str) -> str:
        """The format, fixed by the first record when it was not given."""
        if self.fmt is None:
            # `instruction` asks for a conversation format: a text field is not one
            text_field = self.text_field if self.requested == "auto" else "\0"
            found = detect(apply_columns(record, self.columns, where), text_field)
            if found is None:
                fields = ", ".join(f"'{k}'" for k in record) or "none"
                text = f"no '{self.text_field}' field (text) and no" if self.requested == "auto" else "not a"
                raise UserError(
                    f"{where}: {text} conversation: 'messages', 'conversations' "
                    f"(ShareGPT), 'instruction'/'output' (Alpaca) or 'prompt'/'response' (the record's fields: "
                    f"{fields}); name the text field with --jsonl_field / text_field, or map fields with columns "
                    "(e.g. {prompt: question, response: answer})"
                )
            self.fmt, self.detected = found, f"detected from {where}"
        return self.fmt

    def text(self, record: dict[str, Any], where: str) -> str:
        record = apply_columns(record, self.columns, where)
        if self.text_field not in record:
            fields = ", ".join(f"'{k}'" for k in record) or "none"
            raise UserError(
                f"{where}: no '{self.text_field}' field (the record's fields: {fields}); name the text "
                "field with text_field / --jsonl_field, or map it with `columns`"
            )
        return check_string(record[self.text_field], where, f"field '{self.text_field}'")

    def describe(self) -> str:
        """What was read, e.g. 'sharegpt (detected from f.jsonl:1)' or 'messages: 10, prompt_response: 5'."""
        if len(self.counts) > 1:
            return ", ".join(f"{fmt}: {n:,} records" for fmt, n in self.counts.most_common())
        return f"{self.fmt} ({self.detected or 'as configured'})"

    def messages(self, record: dict[str, Any], where: str) -> list[dict[str, Any]]:
        fmt = self.resolve(record, where)
        record = apply_columns(record, self.columns, where)
        if self.requested in ("auto", "instruction"):  # a file may mix conversation formats: each record's own keys
            fmt = detect(record, "\0")
            if fmt is None:
                fields = ", ".join(f"'{k}'" for k in record) or "none"
                raise UserError(
                    f"{where}: not a conversation: no 'messages', 'conversations' (ShareGPT), 'instruction'"
                    f"/'output' (Alpaca) or 'prompt'/'response' (the record's fields: {fields})"
                )
        self.counts[fmt] += 1
        missing = [key for key in _KEYS[fmt] if key not in record]
        if missing:
            fields = ", ".join(f"'{k}'" for k in record) or "none"
            origin = f" ({self.detected})" if self.detected else ""
            raise UserError(f"{where}: not a {fmt} record{origin}: no '{missing[0]}' (the record's fields: {fields})")
        if fmt == "sharegpt":
            return _sharegpt(record, where)
        if fmt == "alpaca":
            return _alpaca(record, where)
        if fmt == "messages":
            return conversation({"messages": record["messages"]}, where)
        return conversation({k: record[k] for k in ("prompt", "response", "system") if k in record}, where)


def _sharegpt(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise UserError(
            f"{where}: 'conversations' must be a non-empty array of {{from, value}} objects, got "
            f"{json_type_name(turns)}"
        )
    messages = []
    if record.get("system") not in (None, ""):
        messages.append({"role": "system", "content": check_string(record["system"], where, "'system'")})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: conversations[{i}] must be an object, got {json_type_name(turn)}")
        speaker_key, text_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        for key in (speaker_key, text_key):
            if key not in turn:
                raise UserError(f"{where}: conversations[{i}] has no '{key}' (it has: {', '.join(turn) or 'none'})")
        speaker = check_string(turn[speaker_key], where, f"conversations[{i}].{speaker_key}")
        if speaker.lower() not in SHAREGPT_ROLES:
            raise UserError(
                f"{where}: conversations[{i}].{speaker_key} is '{speaker}'; valid: {', '.join(SHAREGPT_ROLES)}"
            )
        content = check_string(turn[text_key], where, f"conversations[{i}].{text_key}")
        messages.append({"role": SHAREGPT_ROLES[speaker.lower()], "content": content})
    return conversation({"messages": messages}, where)


def _alpaca(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    instruction = check_string(record["instruction"], where, "'instruction'")
    extra = record.get("input")
    extra = "" if extra is None else check_string(extra, where, "'input'")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    values = {"prompt": prompt, "response": check_string(record["output"], where, "'output'")}
    if record.get("system") not in (None, ""):
        values["system"] = record["system"]
    return conversation(values, where)
