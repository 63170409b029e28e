"""Finding the run to resume, and refusing to resume it with a config that changes what was trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.errors import UserError

# Paths whose change does not change what is trained: logging or checkpointing more often, or evaluating
# differently is fine for a resumed run. Everything else (model, LoRA shape, data, optimizer, batch shape, seed,
# and the training target, which sets the length of the learning-rate schedule) must match, or the resumed run
# would not be a continuation of the same run.
MAY_CHANGE = (
    "settings.intervals",
    "settings.checkpointing",
    "settings.export",
    "settings.eval_max_batches",
    "settings.experiment_id",
    "settings.config_file_path",
    "settings.config_folder_path",
    "settings.experiments_root_path",
    "evaluators",
    "eval_datasets",
)


def find_run_to_resume(resume_from: str, experiments_root: Path, experiment_id: str | None) -> tuple[Path, str]:
    """(run folder, checkpoint selector: 'latest' or a checkpoint folder path)."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.exists():
            raise UserError(f"--resume_from: {path} does not exist; pass 'latest', a run folder or a checkpoint folder")
        if (path / "checkpoints").is_dir():
            return path, "latest"
        if path.parent.name == "checkpoints":
            return path.parent.parent, str(path)
        raise UserError(f"--resume_from: {path} is neither a run folder (with checkpoints/) nor a checkpoint folder")
    if experiment_id:
        run_dir = Path(experiments_root) / experiment_id
        if not run_dir.is_dir():
            raise UserError(f"--resume_from latest: no run folder {run_dir}")
        return run_dir, "latest"
    runs = sorted(
        (p for p in Path(experiments_root).glob("*/checkpoints") if p.is_dir()), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise UserError(f"--resume_from latest: no run with checkpoints under {experiments_root}")
    return runs[-1].parent, "latest"


def config_differences(old: Any, new: Any, path: str = "") -> list[str]:
    if path in MAY_CHANGE:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old:
                out += [] if sub in MAY_CHANGE else [f"{sub}: added ({new[key]!r})"]
            elif key not in new:
                out += [] if sub in MAY_CHANGE else [f"{sub}: removed (was {old[key]!r})"]
            else:
                out += config_differences(old[key], new[key], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [d for i, (a, b) in pairs for d in config_differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def check_same_training(old: dict[str, Any], new: dict[str, Any], run_dir: Path, allow: bool) -> list[str]:
    diffs = config_differences(old, new)
    if diffs and not allow:
        listing = "\n".join(f"  - {d}" for d in diffs[:30])
        raise UserError(
            f"refusing to resume {run_dir}: the config changes what was trained:\n{listing}\n"
            "Resume with the original config, or pass --allow_config_change to continue anyway."
        )
    return diffs
