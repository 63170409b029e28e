"""Console output shared by commands: rich on rank 0, silence on other ranks."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape

_stderr = Console(stderr=True, highlight=False, soft_wrap=True)
_stdout = Console(highlight=False, soft_wrap=True)


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print_error(message: str) -> None:
    _stderr.print(f"[bold red]error:[/] {escape(message)}", markup=True, emoji=False)
    sys.stderr.flush()


def info(message: str, *, all_ranks: bool = False) -> None:
    """A line for the user, printed once (rank 0) unless `all_ranks`."""
    if all_ranks or is_main_rank():
        _stdout.print(message, markup=False, emoji=False)


def warn(message: str) -> None:
    if is_main_rank():
        _stderr.print(f"[yellow]warning:[/] {escape(message)}", markup=True, emoji=False)
