"""`lorafit data pack --input X.jsonl|X.txt --tokenizer DIR --output PREFIX`: tokenize into a packed token file."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare training data")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    pack = commands.add_parser(
        "pack",
        help="tokenize a .txt or .jsonl file into a packed token file (PREFIX.bin + PREFIX.json)",
        description="Plain text (a .txt file's paragraphs, or a JSONL text field) is packed as documents joined by "
        "EOS. JSONL with 'messages' or 'prompt'/'response' is rendered with the tokenizer's chat template and "
        "the loss is masked on everything but the assistant's answers (PREFIX.mask.bin).",
    )
    pack.add_argument("--input", type=Path, required=True,
                      help="a .txt file (documents separated by blank lines) or a .jsonl file")  # fmt: skip
    pack.add_argument("--tokenizer", type=Path, required=True, help="folder with the tokenizer (e.g. the model folder)")
    pack.add_argument("--output", type=Path, required=True, help="output prefix: writes PREFIX.bin and PREFIX.json")
    pack.add_argument("--jsonl_field", default="text", help="the JSONL field holding plain text (default: text)")
    pack.add_argument("--format", dest="fmt", default="auto", choices=["auto", "text", "instruction"],
                      help="auto: instruction if the first record has 'messages' or 'prompt', else text")  # fmt: skip
    pack.add_argument("--overwrite", action="store_true", help="replace an existing output")
    pack.add_argument("--no_progress", action="store_true", help="no progress bar")
    pack.set_defaults(func=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    from lorafit.console import info
    from lorafit.data.pack import load_tokenizer, pack_file

    tokenizer = load_tokenizer(args.tokenizer)
    packed = pack_file(args.input, tokenizer, args.output, jsonl_field=args.jsonl_field, fmt=args.fmt,
                       overwrite=args.overwrite, progress=not args.no_progress)  # fmt: skip
    trained = f", {packed.num_trained_tokens:,} of them trained on" if packed.kind == "instruction" else ""
    skipped = f"; {packed.skipped_empty_documents} empty documents skipped" if packed.skipped_empty_documents else ""
    info(f"packed {packed.num_documents:,} {packed.kind} documents into {packed.num_tokens:,} tokens{trained}"
         f" ({packed.dtype}){skipped}: {packed.bin_path}, {packed.meta_path}")  # fmt: skip
    return 0
