"""Console output shared by commands: rich on rank 0, silence on other ranks.

A closed stdout or stderr (`lorafit run ... | head -2`: the reader exits) never stops a command: the closed stream
is pointed at /dev/null (Python's advice for EPIPE), one note goes to the other stream, and the command goes on.
A run keeps writing its run folder (metrics.jsonl, checkpoints, report.md), which is where its record lives.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape


class _Console(Console):
    """rich's Console ends the program on a closed pipe (SystemExit(1), no message); this one hands the
    BrokenPipeError to `_print`, which detaches the stream and carries on."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


_stderr = _Console(stderr=True, highlight=False, soft_wrap=True)
_stdout = _Console(highlight=False, soft_wrap=True)
_closed: set[str] = set()


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def detach_closed_stream(name: str) -> None:
    """Point the closed sys.<name> at /dev/null, so that later writes and the flush at exit succeed."""
    _closed.add(name)
    try:
        fd = getattr(sys, name).fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (poll reports POLLERR on the writing end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def _print(console: Console, name: str, text: str, **kwargs) -> None:
    if name in _closed:
        return
    try:
        console.print(text, **kwargs)
        getattr(sys, name).flush()
    except BrokenPipeError:
        detach_closed_stream(name)
        note = (
            f"note: {name} was closed (the program reading it exited); lorafit carries on without printing "
            "there (a run goes on writing metrics.jsonl, checkpoints and report.md in its run folder)"
        )
        other = "stderr" if name == "stdout" else "stdout"
        _print(_stderr if other == "stderr" else _stdout, other, note, markup=False, emoji=False)


def print_error(message: str) -> None:
    _print(_stderr, "stderr", f"[bold red]error:[/] {escape(message)}", markup=True, emoji=False)


def info(message: str, *, all_ranks: bool = False) -> None:
    """A line for the user, printed once (rank 0) unless `all_ranks`."""
    if all_ranks or is_main_rank():
        _print(_stdout, "stdout", message, markup=False, emoji=False)


def warn(message: str) -> None:
    if is_main_rank():
        _print(_stderr, "stderr", f"[yellow]warning:[/] {escape(message)}", markup=True, emoji=False)


def hide_library_progress_bars() -> None:
    """No transformers/huggingface_hub progress bars (transformers 5 draws `Loading weights` on every model load):
    lorafit says what it loads in its own lines. HF_HUB_DISABLE_PROGRESS_BARS=0 keeps them."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("0", "false", "no"):
        return
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
        return
    # transformers takes its switch from huggingface_hub's when it is imported (transformers/utils/logging.py), so a
    # command that never needs transformers (`configs list`, a config error) does not pay ~0.5 s CPU importing it
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def note(message: str) -> None:
    """Something the user may want to know that is not a problem (stderr, so it never mixes into command output)."""
    if is_main_rank():
        _print(_stderr, "stderr", f"[dim]note:[/] {escape(message)}", markup=True, emoji=False)


class terminal_progress_bars:  # noqa: N801 - used as a context manager, like contextlib's
    """transformers' bars on inside the block when stderr is a terminal (a person watching a long write), never in
    a log or a pipe, where each redraw is a line of noise; as before after it."""

    def __enter__(self) -> None:
        from transformers.utils import logging

        self.was_on = logging.is_progress_bar_enabled()
        if sys.stderr.isatty():
            logging.enable_progress_bar()

    def __exit__(self, *exc) -> None:
        from transformers.utils import logging

        if not self.was_on:
            logging.disable_progress_bar()
