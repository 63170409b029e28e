"""The `lorafit` command: parse arguments, hand off to a command module, turn user errors into one message.

Each command lives in `lorafit/commands/<name>.py` with `add_parser(subparsers)`; the parser's `func`
receives the parsed arguments. No logic here beyond error presentation.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lorafit.errors import UserError

COMMANDS = ["run", "validate", "components", "models", "data", "merge", "generate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description="LoRA fine-tuning of Hugging Face causal LMs.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for user errors too")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"lorafit.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # --debug is accepted anywhere on the line, so `lorafit run ... --debug` works too
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    args.debug = debug
    try:
        result = args.func(args)
    except UserError as error:
        if debug:
            raise
        from lorafit.console import print_error

        print_error(error.render())
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def entry() -> int:
    """The `lorafit` program (console script, `python -m lorafit`, torchrun's script): `main` under tbbmalloc."""
    from lorafit.allocator import reexec_under_tbbmalloc

    reexec_under_tbbmalloc(sys.argv[1:])  # returns only when there is nothing to change
    return main()
