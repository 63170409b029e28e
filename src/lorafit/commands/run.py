"""`lorafit run --config_file_path X`: train from a config (also under torchrun)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafit import allocator


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="train from a config (works under torchrun too)")
    parser.add_argument("--config_file_path", "--config", type=Path, required=True, metavar="PATH")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides (OmegaConf dotlist), e.g. settings.step_profile.sequence_length=256; "
        "recorded in config.resolved.yaml",
    )
    parser.add_argument(
        "--experiments_root_path",
        type=Path,
        default=Path("experiments"),
        help="where run folders are created (default: ./experiments)",
    )
    parser.add_argument("--experiment_id", help="run folder name (default: timestamp + config hash)")
    parser.add_argument(
        "--resume_from",
        metavar="latest|PATH",
        help="continue a run: 'latest' (newest run, or the one named by --experiment_id), "
        "a run folder, or a checkpoint folder",
    )
    parser.add_argument(
        "--allow_config_change", action="store_true", help="resume even if the config changes what was trained"
    )
    allocator.add_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafit.run.experiment import check_experiment_id
    from lorafit.run.runner import RunRequest, run

    check_experiment_id(args.experiment_id)

    run(
        RunRequest(
            args.config_file_path,
            args.experiments_root_path,
            args.experiment_id,
            args.resume_from,
            args.allow_config_change,
            tuple(args.overrides),
        )
    )
    return 0
