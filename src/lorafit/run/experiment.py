"""The run folder: `<experiments_root>/<experiment_id>/`, created once and never overwritten.

It holds a byte copy of the user's config (`config.yaml`), the resolved config (`config.resolved.yaml`), and
everything the run writes (metrics, checkpoints, adapter).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from lorafit import allocator
from lorafit.atomic import write_atomic
from lorafit.errors import UserError, describe_storage_error, storage_error

CONFIG_COPY = "config.yaml"
RESOLVED_CONFIG = "config.resolved.yaml"


def default_experiment_id(config_path: Path, experiments_root: Path | None = None) -> str:
    """A timestamp plus a short hash of the config bytes: sortable, and tells configs apart. Two runs of the same
    config started within one second (`lorafit.train` in a loop) would get the same id: the second one gets
    `_2`, `_3`, ... appended, the first folder free under `experiments_root`, instead of failing on "exists"."""
    digest = hashlib.sha256(Path(config_path).read_bytes()).hexdigest()[:8]
    base = time.strftime("%Y-%m-%d__%H-%M-%S") + f"_{digest}"
    if experiments_root is None:
        return base
    candidate, n = base, 1
    while (Path(experiments_root) / candidate).exists():
        n += 1
        candidate = f"{base}_{n}"
    return candidate


MAX_ID_BYTES = 255  # a file name's limit on common file systems (NAME_MAX)


def check_experiment_id(experiment_id: str | None) -> None:
    """An id names one folder directly under the experiments root: no separators, no `..`, not too long."""
    if experiment_id is None:
        return
    if (
        not experiment_id.strip()
        or experiment_id.startswith("-")
        or any(ord(c) < 32 or ord(c) == 127 for c in experiment_id)
    ):
        raise UserError(
            f"--experiment_id {experiment_id!r}: an experiment id is a visible folder name: not blank, "
            "no control characters, not starting with '-' (it would read as an option)"
        )
    separators = {"/", os.sep, os.altsep or "/"}
    if not experiment_id or experiment_id in (".", "..") or any(s in experiment_id for s in separators):
        raise UserError(
            f"--experiment_id {experiment_id!r}: an experiment id is one folder name (no '/', no '..'); "
            "the run folder is always <experiments_root_path>/<experiment_id>"
        )
    if "\0" in experiment_id or len(experiment_id.encode("utf-8", "surrogateescape")) > MAX_ID_BYTES:
        raise UserError(
            f"--experiment_id: {len(experiment_id)} characters; a folder name holds at most "
            f"{MAX_ID_BYTES} bytes and no NUL"
        )


def create_run_dir(
    root: Path, experiment_id: str, config_path: Path, resolved: dict[str, Any], overrides: tuple[str, ...] = ()
) -> Path:
    check_experiment_id(experiment_id)
    root = Path(root)
    run_dir = root / experiment_id
    if run_dir.is_symlink() and not run_dir.exists():
        raise UserError(
            f"--experiment_id {experiment_id}: {run_dir} is a broken link to {os.readlink(run_dir)}; "
            "remove the link or choose another --experiment_id"
        )
    if run_dir.exists():
        if not any((run_dir / "checkpoints").glob("step_*/COMPLETE")):  # killed before its first checkpoint
            raise UserError(
                f"run folder already exists: {run_dir}, with no checkpoint to continue from (the run "
                "stopped before its first one); lorafit never overwrites a run: pass another "
                f"--experiment_id, or delete {run_dir} to reuse this one"
            )
        raise UserError(
            f"run folder already exists: {run_dir}; lorafit never overwrites a run. Pass another --experiment_id, "
            f"or --resume_from latest (or a checkpoint path) with --experiment_id {experiment_id} to continue it"
        )
    blocking = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"--experiments_root_path {root}: {blocking} is a file, not a folder; choose another root")
    try:
        run_dir.mkdir(parents=True)
    except OSError as error:
        reason = describe_storage_error(error) if storage_error(error) else str(error)
        raise UserError(f"--experiments_root_path {root}: cannot create the run folder: {reason}") from None
    try:
        (run_dir / CONFIG_COPY).write_bytes(Path(config_path).read_bytes())
        write_resolved(run_dir, resolved, overrides)
    except OSError as error:
        shutil.rmtree(run_dir, ignore_errors=True)  # created by this call a moment ago: nothing of the user's
        reason = describe_storage_error(error) if storage_error(error) else str(error)
        raise UserError(f"--experiments_root_path {root}: cannot write the run folder: {reason}") from None
    return run_dir


def write_resolved(run_dir: Path, resolved: dict[str, Any], overrides: tuple[str, ...] = ()) -> None:
    """The resolved config; command-line overrides are applied in it and listed in a comment on top, with the
    memory allocator the run ran under (a record in a comment: a key would be one more setting for the config's
    own program, e.g. Modalities, to refuse)."""
    text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
    header = [f"# command-line override: {item}\n" for item in overrides]
    header.append(f"# memory allocator: {allocator.active()} (chosen by --allocator or LORAFIT_MALLOC)\n")
    text = "".join(header) + text
    write_atomic(run_dir / RESOLVED_CONFIG, text)


def read_resolved(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir} is not a lorafit run folder: {RESOLVED_CONFIG} is missing")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
