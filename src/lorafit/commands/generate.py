"""`lorafit generate --model DIR [--adapter DIR] (--prompt TEXT | --prompts_file F | --interactive) [--chat]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorafit import allocator
from lorafit.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text with a model (and optionally an adapter)")
    parser.add_argument("--model", type=Path, required=True, help="model folder, or a run config (YAML)")
    parser.add_argument("--adapter", type=Path, help="adapter folder (PEFT format)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; the answer is printed")
    source.add_argument(
        "--prompts_file",
        "--prompts-file",
        type=Path,
        metavar="FILE",
        help="one prompt per line (.txt), or JSON Lines with 'prompt' or 'messages' (.jsonl); "
        "answered in batches, printed as JSON Lines {prompt, output}",
    )
    source.add_argument(
        "--interactive",
        action="store_true",
        help="a chat: each line you type is a user message, the conversation is kept ('/reset' "
        "starts over, '/exit' or end of input stops); implies --chat",
    )
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the tokenizer's chat template (default: how the adapter was trained, else off)",
    )
    parser.add_argument(
        "--chat_template",
        default=None,
        metavar="NAME|FILE",
        help="chatml, llama3, plain or a Jinja file instead of the one the adapter was trained with "
        "(saved with it as chat_template.jinja) or the tokenizer's own",
    )
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument(
        "--top_p",
        type=float,
        default=1.0,
        help="nucleus sampling: keep the smallest set of tokens "
        "with this much probability (1 = all; with --temperature > 0)",
    )
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible answers)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per batch with --prompts_file")
    allocator.add_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafit.outputs.inference import generate_batch, load_with_adapter

    sampling = _sampling(args)
    chat = True if args.interactive else chat_default(args.adapter) if args.chat is None else args.chat
    prompts = _read_prompts(args.prompts_file) if args.prompts_file else None
    if prompts and any(isinstance(p, list) for p in prompts):
        if args.chat is False:
            raise UserError(
                f"--prompts_file {args.prompts_file} holds 'messages' conversations, which only a chat "
                "template turns into text: drop --no-chat"
            )
        chat = True  # a conversation is a chat prompt, whatever the adapter was trained on
    model, tokenizer = load_with_adapter(args.model, args.adapter, flag="--model", chat_template=args.chat_template)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    if args.interactive:
        return _interactive(model, tokenizer, sampling)
    if prompts is not None:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            for prompt, text in zip(
                batch, generate_batch(model, tokenizer, batch, chat=chat, sampling=sampling), strict=True
            ):
                print(json.dumps({"prompt": prompt, "output": text}, ensure_ascii=False), flush=True)
        return 0
    (text,) = generate_batch(model, tokenizer, [args.prompt], chat=chat, sampling=sampling)
    if not text.strip():
        explain_empty(args, chat, tokenizer)
    print(text)
    return 0


def _sampling(args: argparse.Namespace):
    from lorafit.outputs.inference import Sampling

    checks = [
        (args.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"),
        (args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}"),
        (0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}"),
        (args.top_k >= 0, f"--top_k must be >= 0, got {args.top_k}"),
        (args.batch_size >= 1, f"--batch_size must be >= 1, got {args.batch_size}"),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise UserError("; ".join(problems))
    if args.temperature == 0 and (args.top_p < 1 or args.top_k > 0):
        from lorafit.console import note

        note("--top_p / --top_k act only when sampling: give --temperature > 0 (0 is greedy)")
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)


def _read_prompts(path: Path) -> list:
    """Prompts of a .txt (one per non-empty line) or .jsonl file ('prompt' text or 'messages' conversation)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts_file {path}: cannot read it ({e})") from None
    prompts: list = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{number}: not JSON ({e})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            prompts.append(record["messages"])
        else:
            raise UserError(f"{path}:{number}: needs a 'prompt' string or a 'messages' list")
    if not prompts:
        raise UserError(f"--prompts_file {path}: no prompts in it")
    return prompts


def _interactive(model, tokenizer, sampling) -> int:
    """A chat on stdin/stdout: the whole conversation so far is the prompt of each answer."""
    from lorafit.outputs.inference import generate_batch

    tty = sys.stdin.isatty()
    if tty:
        print("chat: type a message ('/reset' starts over, '/exit' or Ctrl-D stops)", file=sys.stderr)
    messages: list[dict] = []
    while True:
        if tty:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if text == "/reset":
            messages = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        (answer,) = generate_batch(model, tokenizer, [messages], chat=True, sampling=sampling)
        messages.append({"role": "assistant", "content": answer.strip()})
        print(f"assistant> {answer.strip()}", flush=True)


def chat_default(adapter: Path | None) -> bool:
    """A chat-trained adapter answers chat-templated prompts; given raw text it often ends at once (empty output)."""
    from lorafit.console import note
    from lorafit.lora.provenance import TRAINING_FILE, read_training_info

    trained = read_training_info(adapter).get("prompt_format")
    if trained == "chat":
        note(
            f"{adapter / TRAINING_FILE}: the adapter was trained on chat-formatted data, so the prompt is wrapped in "
            "the chat template (--no-chat sends the raw text)"
        )
    return trained == "chat"


def explain_empty(args: argparse.Namespace, chat: bool, tokenizer) -> None:
    """An empty answer is a result, not an error; say why it is empty and what else to try."""
    from lorafit.console import warn

    hint = ""
    if not chat and getattr(tokenizer, "chat_template", None):
        hint = " The model may expect its chat template: try --chat."
    elif chat:
        hint = " --no-chat sends the raw text instead, if the model or adapter was trained on plain text."
    warn(
        f"the model generated no text within --max_new_tokens {args.max_new_tokens}: it produced only special "
        f"tokens (e.g. {tokenizer.eos_token!r}, end of sequence) or whitespace.{hint}"
    )
