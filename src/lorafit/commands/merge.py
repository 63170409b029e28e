"""`lorafit merge --base DIR_or_config --adapter DIR --output_dir DIR`: a merged Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafit import allocator


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("merge", help="fold an adapter into its base model and save a Hugging Face folder")
    parser.add_argument("--base", type=Path, required=True, help="base model folder, or a run config (YAML)")
    parser.add_argument("--adapter", type=Path, required=True, help="adapter folder (PEFT format)")
    parser.add_argument("--output_dir", type=Path, required=True, help="new folder for the merged model")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    allocator.add_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafit.errors import UserError
    from lorafit.lora.provenance import record_merge
    from lorafit.outputs.inference import load_with_adapter
    from lorafit.outputs.merged import export_merged

    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UserError(f"--output_dir: {args.output_dir} is a file, not a folder; choose a new folder")
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        raise UserError(f"--output_dir: {args.output_dir} exists and is not empty; choose a new folder")
    model, tokenizer = load_with_adapter(args.base, args.adapter, args.dtype)
    export_merged(model, tokenizer, args.output_dir)
    record_merge(args.output_dir, args.adapter, args.base)  # so that the adapter is never applied to it again
    return 0
