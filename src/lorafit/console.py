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


def hide_library_progress_bars() -> None:
    """No transformers/huggingface_hub progress bars (transformers 5 draws `Loading weights` on every model load):
    lorafit says what it loads in its own lines. HF_HUB_DISABLE_PROGRESS_BARS=0 keeps them."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("0", "false", "no"):
        return
    from transformers.utils import logging

    logging.disable_progress_bar()


class library_progress_bars:  # noqa: N801 - used as a context manager, like contextlib's
    """transformers' bars on inside the block (the one `lorafit merge` shows while writing), as before after it."""

    def __enter__(self) -> None:
        from transformers.utils import logging

        self.was_on = logging.is_progress_bar_enabled()
        logging.enable_progress_bar()

    def __exit__(self, *exc) -> None:
        from transformers.utils import logging

        if not self.was_on:
            logging.disable_progress_bar()
