"""`lorafit generate --model DIR [--adapter DIR] --prompt TEXT [--chat]`: quick text generation."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafit import allocator


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text with a model (and optionally an adapter)")
    parser.add_argument("--model", type=Path, required=True, help="model folder, or a run config (YAML)")
    parser.add_argument("--adapter", type=Path, help="adapter folder (PEFT format)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the tokenizer's chat template (default: how the adapter was trained, else off)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    allocator.add_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafit.errors import UserError
    from lorafit.inference import generate, load_with_adapter

    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    chat = chat_default(args.adapter) if args.chat is None else args.chat
    model, tokenizer = load_with_adapter(args.model, args.adapter, flag="--model")
    text = generate(
        model, tokenizer, args.prompt, chat=chat, max_new_tokens=args.max_new_tokens, temperature=args.temperature
    )
    if not text.strip():
        explain_empty(args, chat, tokenizer)
    print(text)
    return 0


def chat_default(adapter: Path | None) -> bool:
    """A chat-trained adapter answers chat-templated prompts; given raw text it often ends at once (empty output)."""
    from lorafit.console import warn
    from lorafit.lora.provenance import TRAINING_FILE, read_training_info

    trained = read_training_info(adapter).get("prompt_format")
    if trained == "chat":
        warn(f"{adapter / TRAINING_FILE}: the adapter was trained on chat-formatted data, so the prompt is wrapped in "
             "the chat template (--no-chat sends the raw text)")  # fmt: skip
    return trained == "chat"


def explain_empty(args: argparse.Namespace, chat: bool, tokenizer) -> None:
    """An empty answer is a result, not an error; say why it is empty and what else to try."""
    from lorafit.console import warn

    hint = ""
    if not chat and getattr(tokenizer, "chat_template", None):
        hint = " The model may expect its chat template: try --chat."
    elif chat:
        hint = " --no-chat sends the raw text instead, if the model or adapter was trained on plain text."
    warn(f"the model generated no text within --max_new_tokens {args.max_new_tokens}: it produced only special "
         f"tokens (e.g. {tokenizer.eos_token!r}, end of sequence) or whitespace.{hint}")  # fmt: skip
