"""User-facing errors.

Anything the user can fix (a config key, a file, an argument) is raised as a `UserError`. The CLI prints
it without a traceback and exits with its `exit_code`; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem, located by a YAML-style path such as `lora_model.config.target_layers[2]`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class UserError(Exception):
    """An error the user can fix. `field` is a path relative to the component being built, if any.

    The config builder prefixes `field` with the component's YAML path, so a builder can say
    `raise UserError("file not found: x.bin", field="checkpoint_path")` and the user reads
    `checkpointed_model.config.checkpoint_path: file not found: x.bin`.
    """

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None, problems: list[Problem] | None = None):
        self.problems = list(problems) if problems else [Problem(field or "", message)]
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)

    def prefixed(self, prefix: str) -> UserError:
        """The same error with every problem path placed under `prefix`."""
        return UserError("", problems=[Problem(join_path(prefix, p.path), p.message) for p in self.problems])


class ConfigError(UserError):
    """A problem in the YAML config (exit code 2)."""


def join_path(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def nearest(word: str, choices: list[str] | set[str] | tuple[str, ...]) -> str | None:
    """The closest valid choice, for 'did you mean' hints."""
    import difflib

    found = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(word: str, choices) -> str:
    best = nearest(word, choices)
    return f" (did you mean '{best}'?)" if best else ""


# errors of the machine, not of lorafit: a full disk, a read-only mount, a limit. Reported in one line, no traceback
_STORAGE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "a disk quota is exceeded",
    errno.EFBIG: "a file-size limit was reached (ulimit -f) or the disk is full",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "a file name is too long",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EIO: "an input/output error of the disk",
}


def storage_error(error: BaseException) -> OSError | None:
    """The OSError of the machine (disk full, read-only, ...) behind `error`, also when torch's distributed
    checkpointing wraps it (its CheckpointException holds each rank's exception in `failures`)."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _STORAGE_ERRNOS:
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += [f[0] for f in failures.values() if isinstance(f, tuple) and f]
        pending += [current.__cause__, current.__context__]
    return None


def describe_storage_error(error: OSError, doing: str = "", path: str | os.PathLike | None = None) -> str:
    """One line: what could not be written (the error's file, else `path`), and why, in words."""
    where = f" {error.filename or path}" if error.filename or path else " a file"
    what = f"{doing}: " if doing else ""
    return (
        f"{what}cannot write{where}: {os.strerror(error.errno)} ({_STORAGE_ERRNOS[error.errno]}, "
        f"{errno.errorcode.get(error.errno, error.errno)})"
    )


@contextlib.contextmanager
def writing(path: str | os.PathLike, flag: str) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a file-size limit, a read-only folder) as one UserError naming
    `flag` and the file. A size limit can surface without an errno ("1024 requested and 0 written")."""
    try:
        yield
    except OSError as error:
        if error.errno in _STORAGE_ERRNOS:
            raise UserError(f"{flag}: {describe_storage_error(error, path=path)}") from None
        if error.errno is None:
            raise UserError(
                f"{flag}: cannot write {path}: {error} (the disk is full or a file-size limit was reached)"
            ) from None
        raise
