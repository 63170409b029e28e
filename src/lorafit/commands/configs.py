"""`lorafit configs list` / `lorafit configs cp NAME DEST`: the shipped configs, copied out to start from (as
torchtune's `tune cp` does). They are the repository's configs/*.yaml, each tested by
tests/e2e/test_shipped_configs.py; a wheel carries them as lorafit/configs/ (setup.py), a checkout (pip install -e)
reads them where they are."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("configs", help="list the shipped configs, or copy one out to start from")
    commands = parser.add_subparsers(dest="configs_command", metavar="SUBCOMMAND", required=True)
    listing = commands.add_parser("list", help="the shipped configs, each with what it is for")
    listing.set_defaults(func=run_list)
    copy = commands.add_parser("cp", help="copy a shipped config to DEST (never over an existing file)")
    copy.add_argument("name", help="a name from `lorafit configs list` (e.g. chat_sft), with or without .yaml")
    copy.add_argument("dest", type=Path, help="the new file, or a folder to copy it into")
    copy.set_defaults(func=run_cp)


def configs_folder() -> Path:
    from lorafit.errors import UserError

    package = Path(__file__).resolve().parents[1] / "configs"  # lorafit/configs: an installed wheel
    checkout = Path(__file__).resolve().parents[3] / "configs"  # src/lorafit/commands -> the checkout's root
    for folder in (package, checkout):
        if folder.is_dir():
            return folder
    raise UserError(
        f"the shipped configs are missing: neither {package} (a pip install) nor {checkout} (a checkout) "
        "is a folder; reinstall lorafit"
    )


def shipped() -> dict[str, Path]:
    return {path.stem: path for path in sorted(configs_folder().glob("*.yaml"))}


def purpose(path: Path) -> str:
    """The config's first comment line, which says what it is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def run_list(args: argparse.Namespace) -> int:
    configs = shipped()
    width = max(map(len, configs))
    for name, path in configs.items():
        print(f"{name:<{width}}  {purpose(path)}")
    print(f"\n(in {configs_folder()}; `lorafit configs cp NAME my_run.yaml` copies one out)")
    return 0


def run_cp(args: argparse.Namespace) -> int:
    from lorafit.atomic import write_atomic
    from lorafit.console import info
    from lorafit.errors import UserError, did_you_mean

    configs = shipped()
    name = args.name.removesuffix(".yaml")
    if name not in configs:
        raise UserError(f"no shipped config '{args.name}'{did_you_mean(name, configs)}; valid: {', '.join(configs)}")
    dest = args.dest / f"{name}.yaml" if args.dest.is_dir() else args.dest
    if dest.exists() or dest.is_symlink():
        raise UserError(f"{dest} already exists; lorafit never overwrites it: choose another name")
    if not dest.parent.is_dir():
        raise UserError(f"{dest.parent} is not a folder")
    write_atomic(dest, configs[name].read_text(encoding="utf-8"))
    info(
        f"copied {configs[name]} to {dest}; edit the lines marked '<-' (model folder, data file), check it "
        f"with `lorafit validate --config {dest}`, preview the data with `lorafit data preview --config "
        f"{dest}`"
    )
    return 0
