"""`lorafit export gguf --model DIR_or_config [--adapter DIR] --output X.gguf [--dtype ...]`: one GGUF file for
llama.cpp / Ollama, the adapter (if any) merged first."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a model in another format (GGUF for llama.cpp / Ollama)")
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    gguf = formats.add_parser("gguf", help="a Llama-family model (+ adapter, merged) as one GGUF file")
    gguf.add_argument(
        "--model", type=Path, required=True, help="merged model folder, base folder (with --adapter), or run config"
    )
    gguf.add_argument("--adapter", type=Path, help="adapter folder (PEFT format) to merge before writing")
    gguf.add_argument("--output", type=Path, required=True, help="the .gguf file to write")
    gguf.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                      help="type of the 2-D weights (norms stay f32); default f16")  # fmt: skip
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    gguf.set_defaults(func=run_gguf)


def run_gguf(args: argparse.Namespace) -> int:
    from lorafit.console import info
    from lorafit.errors import UserError
    from lorafit.gguf_export import export_gguf
    from lorafit.inference import load_with_adapter
    from lorafit.lora import has_lora, merge_and_unload

    if args.output.exists() and not args.overwrite:  # before minutes of loading, and never replaced unasked
        raise UserError(f"--output: {args.output} exists; choose a new file or pass --overwrite to replace it")
    if args.output.suffix != ".gguf":
        raise UserError(f"--output: {args.output} should end in .gguf (llama.cpp and Ollama look for it)")
    model, tokenizer = load_with_adapter(args.model, args.adapter, "fp32", flag="--model")
    if has_lora(model):
        model = merge_and_unload(model)
    path = export_gguf(model, tokenizer, args.output, dtype=args.dtype, overwrite=args.overwrite,
                       name=Path(args.model).stem)  # fmt: skip
    info(f"GGUF written to {path} ({path.stat().st_size / 1e6:.1f} MB, {args.dtype})")
    return 0
