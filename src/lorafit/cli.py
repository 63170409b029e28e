"""The `lorafit` command: parse arguments, hand off to a command module, turn user errors into one message.

Each command lives in `lorafit/commands/<name>.py` with `add_parser(subparsers)`; the parser's `func`
receives the parsed arguments. No logic here beyond error presentation.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator

from lorafit import allocator
from lorafit.errors import UserError
from lorafit.third_party_noise import silence_torchao_import_noise

COMMANDS = ["run", "validate", "components", "configs", "models", "data", "merge", "generate", "export"]


class Parser(argparse.ArgumentParser):
    """Every `--snake_case` option also answers to `--kebab-case`: Modalities' commands spell options with
    underscores (`--config_file_path`), most command-line tools with hyphens. Subcommands inherit the class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        kebab = [n.replace("_", "-") for n in names if n.startswith("--") and "_" in n]
        return super().add_argument(*names, *[k for k in kebab if k not in names], **kwargs)


class _HelpFormatter(argparse.HelpFormatter):
    """`--config_file_path, --config, --config-file-path PATH`: the value's name once, not after every spelling."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {value}"


def build_parser() -> argparse.ArgumentParser:
    from lorafit import __version__

    parser = Parser(
        prog="lorafit",
        description="LoRA fine-tuning of Hugging Face causal LMs. Options take --snake_case (as Modalities writes "
        "them) or --kebab-case spellings.",
    )
    parser.add_argument("--version", action="version", version=f"lorafit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for user errors too")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"lorafit.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None, *, launcher: bool = False) -> int:
    # the program's own process: transformers imports torchao whenever it is installed (the nf4 extra), and its
    # CUDA-library warnings are harmless here. Importing lorafit as a library leaves other loggers alone.
    silence_torchao_import_noise()
    argv = sys.argv[1:] if argv is None else argv
    # --debug is accepted anywhere on the line, so `lorafit run ... --debug` works too
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    args.debug = debug
    if launcher:  # the `lorafit` program's one launcher step: --allocator / LORAFIT_MALLOC (may re-execute once)
        allocator.launch(args.command, getattr(args, "allocator", None))
    from lorafit.console import hide_library_progress_bars

    hide_library_progress_bars()
    try:
        with _sigterm_as_interrupt():
            result = args.func(args)
    except UserError as error:
        if debug:
            raise
        from lorafit.console import print_error

        print_error(error.render())
        return error.exit_code
    except KeyboardInterrupt as interrupt:
        print("interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
    except BrokenPipeError:  # `lorafit components | head`: the reader has what it wanted; no traceback at exit
        from lorafit.console import detach_closed_stream, stdout_reader_gone

        if debug or not stdout_reader_gone():
            raise  # some other pipe or socket broke: not the user's doing
        detach_closed_stream("stdout")
        return 0
    except BaseException as error:  # BaseException: torch's CheckpointException (a disk full while saving) is one
        from lorafit.errors import describe_storage_error, storage_error

        cause = storage_error(error)
        if cause is None or debug:
            raise
        from lorafit.console import print_error

        doing = "saving a checkpoint" if type(error).__name__ == "CheckpointException" else ""
        hint = (
            "; complete checkpoints already written are kept: make room, then continue with --resume_from latest"
            if args.command == "run"
            else ""
        )
        print_error(describe_storage_error(cause, doing) + hint)
        return 2
    return int(result or 0)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it cleans up (temporary files, partial outputs) exactly as
    after Ctrl-C instead of dying with them on disk."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry() -> int:
    """The `lorafit` program (console script, `python -m lorafit`, torchrun's script): `main` with its launcher
    step (lorafit/allocator.py)."""
    return main(launcher=True)
