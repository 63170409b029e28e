"""Chat templates a config can name: built-in ones, a Jinja file, or the tokenizer's own.

`tokenizer.config.chat_template` (and `--chat_template` of `lorafit data pack|preview` and `lorafit generate`)
takes one of:

- null or `tokenizer`: the tokenizer's own (`chat_template` in tokenizer_config.json or chat_template.jinja);
- `chatml`: `<|im_start|>{role}\\n{content}<|im_end|>\\n` turns (Qwen, SmolLM2, OpenHermes), no default system
  prompt;
- `llama3`: `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` turns after the BOS token;
- `plain`: for base models without chat tokens: `### User:` / `### Assistant:` turns, each answer closed by the
  tokenizer's EOS token (so generation stops there);
- a path: that Jinja template file (e.g. `templates/mine.jinja`), relative to where lorafit runs.

A named template replaces the tokenizer's own for everything that renders conversations from that tokenizer:
the training data (whose cache is keyed by the template's text), the evaluators' prompts and the tokenizer a
run saves. `chatml` and `llama3` expect their markers to be tokens of the tokenizer; where they are not, the log
says so (they are then trained as ordinary text pieces).

Some templates add a system prompt of their own to a conversation that has none (SmolLM2's adds "You are a
helpful AI assistant named SmolLM, trained by Hugging Face"). `default_system_prompt` finds it by rendering a
conversation with and without a system message; packing says how many conversations got it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.console import info
from lorafit.errors import UserError, did_you_mean

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
PLAIN = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- else %}{{- '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Assistant:\\n' }}{%- endif %}"
)
BUILTIN: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "plain": PLAIN}
# the tokens a built-in template's turns are made of: where the tokenizer lacks them, they are split into pieces
MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}
OWN = "tokenizer"
NAMES = (OWN, *BUILTIN)


def check_template_name(value: str | None) -> str | None:
    """`value` unchanged when it names a template; else a ValueError naming the valid choices (for pydantic)."""
    if value is None or value in NAMES:
        return value
    path = Path(value)
    if not path.is_file():
        looks_like_file = "/" in value or path.suffix in (".jinja", ".j2", ".txt")
        what = f"no such file: {value}" if looks_like_file else f"unknown chat template '{value}'"
        what += "" if looks_like_file else did_you_mean(value, NAMES)
        raise ValueError(f"{what}; valid: {', '.join(NAMES)}, or the path of a Jinja template file")
    _compile(_read(path), value)
    return value


def template_text(value: str | None) -> str | None:
    """The Jinja text `value` names (None: keep the tokenizer's own)."""
    if value is None or value == OWN:
        return None
    if value in BUILTIN:
        return BUILTIN[value]
    check_template_name(value)  # a value that did not come through a config (the command line)
    return _read(Path(value))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the chat template {path}: {e}") from None


def _compile(text: str, where: str) -> None:
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where}, line {e.lineno}: not a valid Jinja template: {e.message}") from None


def use_template(tokenizer: Any, value: str | None, *, field: str | None = None) -> Any:
    """Give `tokenizer` the template `value` names (in place); say when a built-in's markers are not its tokens."""
    try:
        text = template_text(value)
    except ValueError as e:
        raise UserError(str(e), field=field) from None
    if text is None:
        return tokenizer
    tokenizer.chat_template = text
    missing = [m for m in MARKERS.get(str(value), ()) if m not in tokenizer.get_vocab()]
    if missing:
        info(
            f"chat template {value}: {', '.join(missing)} are not tokens of this tokenizer, so they are trained as "
            "several ordinary tokens each, and generation stops only at the tokenizer's EOS "
            f"({tokenizer.eos_token!r}); `plain` closes each answer with that EOS token"
        )
    return tokenizer


_PROBE_SYSTEM, _PROBE_USER = "\x01lorafit system probe\x01", "\x01lorafit user probe\x01"


def default_system_prompt(tokenizer: Any) -> str | None:
    """The text the tokenizer's template puts where a system message would go when a conversation has none.

    The rendering with a system message is A + SYSTEM + B; when the rendering without one is A + D + B with D
    not empty, D is the default the template adds (exact, whatever the template's syntax).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": _PROBE_USER}]
    try:
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": _PROBE_SYSTEM}, *user], tokenize=False
        )
        without = tokenizer.apply_chat_template(user, tokenize=False)
    except Exception:  # a template that refuses this shape (e.g. system messages): no default to report
        return None
    if not (isinstance(with_system, str) and isinstance(without, str)) or _PROBE_SYSTEM not in with_system:
        return None
    head, tail = with_system.split(_PROBE_SYSTEM, 1)
    if len(without) <= len(head) + len(tail) or not (without.startswith(head) and without.endswith(tail)):
        return None
    default = without[len(head) : len(without) - len(tail)]
    return default or None
