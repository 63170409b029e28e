"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

Everything is written under a hidden name beside the target, `.NAME.tmp-HOST-PID-RANDOM` (the same folder, so
the final rename stays on one file system and is atomic; a name of its own, so no file of the user's is ever
written over), then renamed into place. A failure removes the temporary and leaves whatever was at the target
untouched. A process killed while writing leaves its temporary behind; the next write to the same target on this
host removes it once that process is gone (a live writer's temporary is left alone).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lorafit.errors import UserError


def _prefix(target: Path, kind: str = "tmp") -> str:
    return f".{target.name}.{kind}-"


def staging_path(target: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside `target` for this process: `.NAME.tmp-HOST-PID-RANDOM`."""
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return target.with_name(_prefix(target, kind) + owner)


def remove_abandoned(target: Path) -> None:
    """Clean up after processes on this host killed while writing `target`: their temporaries are removed; a
    previous `target` one set aside (`.NAME.old-...`, killed between `publish_folder`'s two renames) is put back
    when nothing took its place, else removed."""
    for kind in ("old", "tmp"):  # old first: a restored target is what the write then replaces
        for path in _abandoned(target, kind):
            if kind == "old" and not (target.exists() or target.is_symlink()):
                os.rename(path, target)
            else:
                _remove(path)


def _abandoned(target: Path, kind: str) -> list[Path]:
    host = socket.gethostname()
    prefix = _prefix(target, kind)
    try:
        candidates = list(target.parent.glob(glob.escape(prefix) + "*"))
    except OSError:  # an unreadable folder: the write itself will say what is wrong
        return []
    found = []
    for path in candidates:
        owner = path.name.removeprefix(prefix).rpartition("-")[0]  # HOST-PID (the host may hold '-')
        path_host, _, pid = owner.rpartition("-")
        if path_host == host and pid.isdigit() and not _alive(int(pid)):
            found.append(path)
    return found


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write `target` into; renamed over `target` when the block succeeds, removed if not."""
    target = Path(target)
    remove_abandoned(target)
    staging = staging_path(target)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def write_atomic(target: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `target` atomically."""
    with atomic_file(target) as staging:
        if isinstance(data, str):
            staging.write_text(data, encoding="utf-8")
        else:
            staging.write_bytes(data)
    return Path(target)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """An empty temporary folder to fill; it becomes `target` when the block succeeds and is removed if not.

    `replace=True`: an existing `target` is replaced (see `publish_folder`); `replace=False`: an existing non-empty
    `target` makes the final rename fail with OSError and stays as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)
    staging = staging_path(target)
    staging.mkdir()
    try:
        yield staging
        publish_folder(staging, target, replace=replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_folder(staging: Path, target: Path, *, replace: bool = True) -> None:
    """Rename the complete folder `staging` to `target`.

    With `replace`, an existing `target` is first renamed aside and deleted only once the new folder is in place,
    so `target` never holds a mix of old and new files, and if the rename fails the old folder is put back.
    """
    old = None
    if replace and (target.exists() or target.is_symlink()):
        old = staging_path(target, "old")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        _remove(old)


def open_append(target: str | os.PathLike) -> IO[str]:
    """`target` opened for appending text, never through a link: a link in its place (planted, or left by a copy
    of the folder) is removed first, its own target untouched, and the file is created as lorafit's own."""
    target = Path(target)
    if target.is_symlink():
        target.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def own_folder(target: str | os.PathLike, what: str, *, create: bool = True) -> Path:
    """`target`, a folder lorafit writes files into (made if missing and `create`); a link or a file in its place
    is refused (writing through a link would put lorafit's files, or replace files, somewhere else)."""
    target = Path(target)
    if target.is_symlink():
        raise UserError(
            f"{what}: {target} is a link to {os.readlink(target)}; lorafit writes only into a folder "
            "of its own there: remove the link"
        )
    if target.exists() and not target.is_dir():
        raise UserError(
            f"{what}: {target} is a file, not a folder; lorafit writes its own folder there: move the file away"
        )
    if create:
        target.mkdir(parents=True, exist_ok=True)
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


__all__ = [
    "atomic_file",
    "atomic_folder",
    "open_append",
    "own_folder",
    "publish_folder",
    "remove_abandoned",
    "staging_path",
    "write_atomic",
]
