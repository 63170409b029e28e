"""`lorafit data pack --input X.jsonl|X.txt --tokenizer DIR --output PREFIX`: tokenize into a packed token file."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafit.data.formats import FORMATS


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
                      help="a .txt file (documents separated by blank lines), a .jsonl file, or a local file or folder "
                      "Hugging Face datasets reads (.json, .csv, .parquet, .arrow, save_to_disk)")  # fmt: skip
    pack.add_argument("--tokenizer", type=Path, required=True, help="folder with the tokenizer (e.g. the model folder)")
    pack.add_argument("--output", type=Path, required=True, help="output prefix: writes PREFIX.bin and PREFIX.json")
    pack.add_argument("--jsonl_field", default="text", help="the JSONL field holding plain text (default: text)")
    pack.add_argument("--format", dest="fmt", default="auto", choices=list(FORMATS),
                      help="auto: from the first record (text, messages, sharegpt, alpaca or prompt_response); "
                      "instruction: any conversation format")  # fmt: skip
    pack.add_argument("--columns", type=_columns, default=None, metavar="FIELD=COLUMN,...",
                      help="the format's fields under your names, e.g. prompt=question,response=answer")  # fmt: skip
    pack.add_argument("--split", default=None, help="the split of a save_to_disk folder with several")
    pack.add_argument("--overwrite", action="store_true", help="replace an existing output")
    pack.add_argument("--no_progress", action="store_true", help="no progress bar")
    pack.set_defaults(func=run_pack)

    index = commands.add_parser(
        "create_raw_index",
        help="index the lines of a JSONL file (Modalities' .idx), for pack_encoded_data",
        description="Writes the pickled list of (byte offset, length) of every line, as `modalities data "
        "create_raw_index` does; every line must be JSON. Never overwrites.",
    )
    index.add_argument("src_path", type=Path, help="the JSONL file")
    index.add_argument("--index_path", type=Path, default=None, help="output (default: SRC_PATH with suffix .idx)")
    index.set_defaults(func=run_create_raw_index)

    encoded = commands.add_parser(
        "pack_encoded_data",
        help="tokenize an indexed JSONL file into a Modalities .pbin file, from a Modalities data-preparation config",
        description="Takes Modalities' data-preparation config as written (settings.src_path, dst_path, index_path, "
        "jq_pattern, eod_token, ...; tokenizer/pretrained_hf_tokenizer). The .pbin is the format Modalities reads.",
    )
    encoded.add_argument("config", type=Path, nargs="?", help="the data-preparation config (YAML)")
    encoded.add_argument("--config_file_path", type=Path, default=None, help="the same, as Modalities spells it")
    encoded.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides (OmegaConf dotlist), e.g. settings.src_path=other.jsonl",
    )
    encoded.add_argument("--overwrite", action="store_true", help="replace an existing settings.dst_path")
    encoded.set_defaults(func=run_pack_encoded_data)


def _columns(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise argparse.ArgumentTypeError(f"'{text}': expected FIELD=COLUMN pairs, e.g. prompt=question,response=answer")
    return {field.strip(): column.strip() for field, column in pairs}


def run_pack(args: argparse.Namespace) -> int:
    from lorafit.console import info
    from lorafit.data.pack import pack_file
    from lorafit.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    packed = pack_file(args.input, tokenizer, args.output, jsonl_field=args.jsonl_field, fmt=args.fmt,
                       columns=args.columns, split=args.split, overwrite=args.overwrite,
                       progress=not args.no_progress)  # fmt: skip
    trained = f", {packed.num_trained_tokens:,} of them trained on" if packed.kind == "instruction" else ""
    skipped = f"; {packed.skipped_empty_documents} empty documents skipped" if packed.skipped_empty_documents else ""
    info(f"packed {packed.num_documents:,} {packed.kind} documents into {packed.num_tokens:,} tokens{trained}"
         f" ({packed.dtype}){skipped}: {packed.bin_path}, {packed.meta_path}")  # fmt: skip
    return 0


def run_create_raw_index(args: argparse.Namespace) -> int:
    from lorafit.console import info
    from lorafit.modalities.data_prep import create_raw_index

    info(f"index written: {create_raw_index(args.src_path, args.index_path)}")
    return 0


def run_pack_encoded_data(args: argparse.Namespace) -> int:
    from lorafit.errors import UserError
    from lorafit.modalities.data_prep import pack_encoded_data

    overrides = list(args.overrides)
    if args.config is not None and args.config_file_path is not None and "=" in str(args.config):
        overrides.insert(0, str(args.config))  # with --config_file_path, the first positional is an override
        args.config = None
    if (args.config is None) == (args.config_file_path is None):
        raise UserError("give the data-preparation config once: `lorafit data pack_encoded_data CONFIG` "
                        "(or --config_file_path CONFIG)")  # fmt: skip
    pack_encoded_data(args.config or args.config_file_path, overrides=tuple(overrides), overwrite=args.overwrite)
    return 0
