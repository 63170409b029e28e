"""Ctrl-C (SIGINT) or SIGTERM during training: finish the step, write a checkpoint, stop with the resume command.

With the default settings a run checkpoints only after its last step, so an interrupt that simply killed the
process lost the whole run. While the loop runs, the first signal only sets a flag: every rank shares it in the
all-reduce the step already does (so all ranks stop at the same step, whichever got the signal), the loop saves a
checkpoint and raises `TrainingInterrupted`. A second signal stops at once, as Ctrl-C usually does.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from lorafit.errors import UserError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(UserError):  # noqa: N818 - it is not an error of the user's: a request honoured
    """Training stopped on a signal after saving a checkpoint; exit code 128 + the signal, as a shell reports."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """A context manager that turns the first SIGINT/SIGTERM into `requested` (the signal's number)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt  # the second signal: stop now, without a checkpoint of this step
        self.requested = signum
        # os.write, not print: a handler that prints while the main thread is printing can raise "reentrant call"
        os.write(
            2,
            f"warning: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint and "
            "stopping (send it again to stop at once)\n".encode(),
        )
