"""The run folder: `<experiments_root>/<experiment_id>/`, created once and never overwritten.

It holds a byte copy of the user's config (`config.yaml`), the resolved config (`config.resolved.yaml`), and
everything the run writes (metrics, checkpoints, adapter).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import UserError

CONFIG_COPY = "config.yaml"
RESOLVED_CONFIG = "config.resolved.yaml"


def default_experiment_id(config_path: Path) -> str:
    """A timestamp plus a short hash of the config bytes: sortable, and tells configs apart."""
    digest = hashlib.sha256(Path(config_path).read_bytes()).hexdigest()[:8]
    return time.strftime("%Y-%m-%d__%H-%M-%S") + f"_{digest}"


def create_run_dir(
    root: Path, experiment_id: str, config_path: Path, resolved: dict[str, Any], overrides: tuple[str, ...] = ()
) -> Path:
    run_dir = Path(root) / experiment_id
    if run_dir.exists():
        raise UserError(
            f"run folder already exists: {run_dir}; lorafit never overwrites a run. Pass another --experiment_id, "
            f"or --resume_from latest (or a checkpoint path) with --experiment_id {experiment_id} to continue it"
        )
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_COPY).write_bytes(Path(config_path).read_bytes())
    write_resolved(run_dir, resolved, overrides)
    return run_dir


def write_resolved(run_dir: Path, resolved: dict[str, Any], overrides: tuple[str, ...] = ()) -> None:
    """The resolved config; command-line overrides are applied in it and listed in a comment on top."""
    text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
    if overrides:
        text = "".join(f"# command-line override: {item}\n" for item in overrides) + text
    tmp = run_dir / (RESOLVED_CONFIG + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(run_dir / RESOLVED_CONFIG)


def read_resolved(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir} is not a lorafit run folder: {RESOLVED_CONFIG} is missing")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
