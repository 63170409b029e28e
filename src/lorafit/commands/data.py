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
    pack.add_argument(
        "--input",
        type=Path,
        required=True,
        help="a .txt file (documents separated by blank lines), a .jsonl file, or a local file or folder "
        "Hugging Face datasets reads (.json, .csv, .parquet, .arrow, save_to_disk)",
    )
    pack.add_argument("--tokenizer", type=Path, required=True, help="folder with the tokenizer (e.g. the model folder)")
    pack.add_argument("--output", type=Path, required=True, help="output prefix: writes PREFIX.bin and PREFIX.json")
    pack.add_argument("--jsonl_field", default="text", help="the JSONL field holding plain text (default: text)")
    pack.add_argument(
        "--format",
        dest="fmt",
        default="auto",
        choices=list(FORMATS),
        help="auto: from the first record (text, messages, sharegpt, alpaca or prompt_response); "
        "instruction: any conversation format",
    )
    pack.add_argument(
        "--columns",
        type=_columns,
        default=None,
        metavar="FIELD=COLUMN,...",
        help="the format's fields under your names, e.g. prompt=question,response=answer",
    )
    pack.add_argument("--split", default=None, help="the split of a save_to_disk folder with several")
    pack.add_argument(
        "--chat_template",
        default=None,
        metavar="NAME|FILE",
        help="conversations: chatml, llama3, plain (base models) or a Jinja file, instead of the "
        "tokenizer's own template",
    )
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
    encoded.add_argument(
        "--modalities_release",
        default="0.5.0",
        choices=["0.5.0", "lora_branch"],
        help="whose bytes to write: 0.5.0 (the current release, default) appends eod_token only to "
        "a document not already ending with it; lora_branch always appends it",
    )
    encoded.set_defaults(func=run_pack_encoded_data)
    _add_preview(commands)


def _columns(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise argparse.ArgumentTypeError(f"'{text}': expected FIELD=COLUMN pairs, e.g. prompt=question,response=answer")
    return {field.strip(): column.strip() for field, column in pairs}


def run_pack(args: argparse.Namespace) -> int:
    from lorafit.console import info
    from lorafit.data.chat_templates import use_template
    from lorafit.data.token_files import pack_file
    from lorafit.models.tokenizer import load_tokenizer

    tokenizer = use_template(load_tokenizer(args.tokenizer), args.chat_template)
    packed = pack_file(
        args.input,
        tokenizer,
        args.output,
        jsonl_field=args.jsonl_field,
        fmt=args.fmt,
        columns=args.columns,
        split=args.split,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    trained = f", {packed.num_trained_tokens:,} of them trained on" if packed.kind == "instruction" else ""
    skipped = f"; {packed.skipped_empty_documents} empty documents skipped" if packed.skipped_empty_documents else ""
    info(
        f"packed {packed.num_documents:,} {packed.kind} documents into {packed.num_tokens:,} tokens{trained}"
        f" ({packed.dtype}){skipped}: {packed.bin_path}, {packed.meta_path}"
    )
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
        raise UserError(
            "give the data-preparation config once: `lorafit data pack_encoded_data CONFIG` "
            "(or --config_file_path CONFIG)"
        )
    pack_encoded_data(
        args.config or args.config_file_path,
        overrides=tuple(overrides),
        overwrite=args.overwrite,
        release=args.modalities_release,
    )
    return 0


def _add_preview(commands) -> None:
    preview = commands.add_parser(
        "preview",
        help="print a few samples of a dataset as training sees them, trained tokens marked, with packing counts",
        description="Either a run config's dataset component (--config, --dataset train_dataset or "
        "eval_datasets.NAME; the tokenized cache is written as a run would) or a file (--input, --tokenizer; "
        "packed into a temporary folder). Trained (loss) tokens are printed inside [[ ]].",
    )
    preview.add_argument("--config_file_path", "--config", type=Path, default=None, metavar="PATH")
    preview.add_argument("--dataset", default="train_dataset", help="train_dataset (default) or eval_datasets.NAME")
    preview.add_argument("--input", type=Path, default=None, help="a data file instead of a config")
    preview.add_argument("--tokenizer", type=Path, default=None, help="with --input: the tokenizer folder")
    preview.add_argument("--format", dest="fmt", default="auto", choices=list(FORMATS), help="with --input")
    preview.add_argument("--chat_template", default=None, metavar="NAME|FILE", help="with --input: as in data pack")
    preview.add_argument("--sequence_length", type=int, default=256, help="with --input (default 256)")
    preview.add_argument("--no_packing", action="store_true", help="with --input: one conversation per sample")
    preview.add_argument("--num_samples", "-n", type=int, default=3, help="how many samples (default 3)")
    preview.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="with --config: config overrides")
    preview.set_defaults(func=run_preview)


def run_preview(args: argparse.Namespace) -> int:
    from lorafit.errors import UserError
    from lorafit.run.preview import build_dataset, preview, preview_file

    if (args.config_file_path is None) == (args.input is None):
        raise UserError("give either --config (a run config) or --input with --tokenizer (a data file)")
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.input is not None:
        if args.tokenizer is None:
            raise UserError("--input needs --tokenizer (the folder that holds tokenizer.json)")
        print(
            preview_file(
                args.input,
                args.tokenizer,
                fmt=args.fmt,
                chat_template=args.chat_template,
                sequence_length=args.sequence_length,
                packing=not args.no_packing,
                num_samples=args.num_samples,
            )
        )
        return 0
    dataset, tokenizer, _seq = build_dataset(args.config_file_path, args.dataset, tuple(args.overrides))
    print(preview(dataset, tokenizer, args.dataset, args.num_samples))
    return 0
