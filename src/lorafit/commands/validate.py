"""`lorafit validate --config_file_path X`: check a whole run config without training.

Models are built on the meta device (no weights loaded), so this takes seconds even for large models.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("validate", help="check a config without training")
    parser.add_argument("--config_file_path", "--config", type=Path, required=True, metavar="PATH")
    parser.add_argument("--verbose", "-v", action="store_true", help="list every adapted module")
    parser.add_argument(
        "--nproc_per_node",
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="processes the run will have on this machine (torchrun's --nproc_per_node): predicts each one's memory",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. settings.step_profile.sequence_length=256",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafit.run.build import validate_config

    print(
        validate_config(
            args.config_file_path, tuple(args.overrides), verbose=args.verbose, processes=args.nproc_per_node
        )
    )
    return 0
