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
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
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
    model, tokenizer = load_with_adapter(args.model, args.adapter, flag="--model")
    print(
        generate(
            model,
            tokenizer,
            args.prompt,
            chat=args.chat,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
    )
    return 0
