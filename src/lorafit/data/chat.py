"""Instruction data: a record -> a conversation -> token ids and a loss mask (1 = train on this token).

Records are `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response"}` with an optional
`"system"`. The conversation is rendered with the tokenizer's own chat template, so training sees exactly
the text that inference (`apply_chat_template(..., add_generation_prompt=True)`) will produce.

Which tokens are the assistant's: for each assistant turn i, the template renders `messages[:i]` with the
generation prompt (everything up to where the answer starts) and `messages[:i + 1]` (through the answer's
end). Both must be prefixes of the whole conversation's rendering, or the template rewrites earlier
turns and prompt and answer cannot be told apart: that is a clear error, never a silent wrong mask.
The character span between the two becomes a token span through the tokenizer's offset mapping (one
tokenization per conversation, and no failure when BPE merges characters across the boundary);
tokenizers without offsets fall back to comparing token prefixes. The span ends at the last end-of-sequence
token inside it (e.g. `<|im_end|>`), so the end token is trained but the template's trailing newline is not.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from lorafit.data.records import check_string, json_type_name
from lorafit.errors import UserError

INSTRUCTION_KEYS = ("messages", "prompt")


def is_instruction_record(record: dict[str, Any]) -> bool:
    return any(key in record for key in INSTRUCTION_KEYS)


def conversation(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The messages of an instruction record, checked: string roles and contents, at least one assistant turn."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty array of {{role, content}} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise UserError(f"{where}: messages[{i}] must be an object, got {json_type_name(message)}")
            for key in ("role", "content"):
                if key not in message:
                    raise UserError(f"{where}: messages[{i}] has no '{key}' (it has: {', '.join(message) or 'none'})")
                check_string(message[key], where, f"messages[{i}].{key}")
        messages = [dict(m) for m in messages]
    elif "prompt" in record:
        missing = [key for key in ("prompt", "response") if key not in record]
        if missing:
            raise UserError(f"{where}: a prompt/response record needs 'response' (it has: {', '.join(record)})")
        messages = [
            {"role": "user", "content": check_string(record["prompt"], where, "'prompt'")},
            {"role": "assistant", "content": check_string(record["response"], where, "'response'")},
        ]
        if "system" in record:
            messages.insert(0, {"role": "system", "content": check_string(record["system"], where, "'system'")})
    else:
        raise UserError(
            f"{where}: an instruction record needs 'messages' or 'prompt'/'response' (it has: "
            f"{', '.join(record) or 'none'})"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no 'assistant' message, so nothing to train on")
    return messages


def _render(tokenizer, messages: list[dict[str, Any]], where: str, generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises its own types (TemplateError, raise_exception(...) in templates)
        raise UserError(f"{where}: the tokenizer's chat template failed on this conversation: {e}") from None
    if not isinstance(text, str):
        raise UserError(f"{where}: the chat template rendered {type(text).__name__}, not text")
    return text


def _not_prefix(where: str, turn: int) -> UserError:
    return UserError(
        f"{where}: the chat template is not prefix-stable at message {turn}: rendering the conversation up to "
        "that assistant turn is not a prefix of rendering all of it, so prompt tokens cannot be told apart from "
        "answer tokens (templates that rewrite earlier turns, e.g. by dropping reasoning, do this)"
    )


def assistant_char_spans(tokenizer, messages: list[dict[str, Any]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant answer in it."""
    full = _render(tokenizer, messages, where, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], where, generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise _not_prefix(where, i)
        spans.append((len(before), len(through)))
    return full, spans


def render_with_mask(tokenizer, messages: list[dict[str, Any]], where: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and the loss mask (1 on assistant tokens, incl. the end token)."""
    full, spans = assistant_char_spans(tokenizer, messages, where)
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        starts = [start for start, _ in encoding["offset_mapping"]]
        # a token belongs to the answer when it starts inside the answer's characters
        token_spans = [(bisect_left(starts, a), bisect_left(starts, b)) for a, b in spans]
    else:
        ids, token_spans = _token_spans_by_prefix(tokenizer, full, spans, messages, where)
    mask = [0] * len(ids)
    eos = tokenizer.eos_token_id
    for start, end in token_spans:
        if eos is not None and eos in ids[start:end]:
            end = start + max(k for k in range(end - start) if ids[start + k] == eos) + 1
        mask[start:end] = [1] * (end - start)
    return ids, mask


def _token_spans_by_prefix(tokenizer, full: str, spans, messages, where: str):
    """Without offsets: the token ids of each prefix must be a prefix of the whole conversation's ids."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    ids = encode(full)
    token_spans = []
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for turn, (a, b) in zip(assistant_turns, spans, strict=True):
        before, through = encode(full[:a]), encode(full[:b])
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise UserError(
                f"{where}: message {turn}: the tokens of the conversation up to this answer differ from the "
                "start of the whole conversation's tokens (the tokenizer merges across the boundary and has no "
                "offset mapping to place the answer); use a fast tokenizer (tokenizer.json)"
            )
        token_spans.append((len(before), len(through)))
    return ids, token_spans
