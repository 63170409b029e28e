"""Everything about resuming a run, in one place: which run and checkpoint, whether this config may continue it,
and putting the checkpoint's state back into the trainer.

Two halves, both used by `lorafit run`:

- `plan_resume` (rank 0, before anything is built): finds the run and the checkpoint (verified), and refuses
  what would not be a continuation of the same training: a config that changes what is trained, a global batch
  that differs (e.g. another number of processes), or a training file edited since the checkpoint. With
  `--allow_config_change` the differences are listed and APPLIED (see `restore`). Resuming another run's
  checkpoint under a new `--experiment_id` starts a new run folder; the other run is never written to.
- `restore` (every rank, in the loop): loads the trainable parameters and optimizer state, the sampler position,
  the counters and the random states, and sets the optimizer and schedule hyper-parameters from THIS run's
  config at the checkpoint's step (the same values when nothing changed).

The checkpoint format itself (atomic save, checksums, load) lives in `lorafit.checkpoint.state`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit.checkpoint.state import (
    TRAINER_STATE,
    file_sha256,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    restore_rng,
    verify_checkpoint,
)
from lorafit.config.run_spec import StepProfile, settings_of
from lorafit.console import info, warn
from lorafit.errors import UserError

# Paths whose change does not change what is trained: logging or checkpointing more often, or evaluating
# differently is fine for a resumed run. Everything else (model, LoRA shape, data, optimizer, seed, and the
# training target, which sets the length of the learning-rate schedule) must match, or the resumed run would not
# be a continuation of the same run.
MAY_CHANGE = (
    "settings.intervals",
    "settings.checkpointing",
    "settings.export",
    "settings.eval_max_batches",
    "settings.allocator",
    "settings.experiment_id",
    "settings.config_file_path",
    "settings.config_folder_path",
    "settings.experiments_root_path",
    "evaluators",
    "eval_datasets",
)
# The split of the global batch into micro batch x accumulation x processes may change (e.g. to resume on another
# number of processes); the global batch itself is compared instead (`_check_global_batch`).
BATCH_SPLIT = (
    "settings.step_profile.local_train_micro_batch_size",
    "settings.step_profile.micro_batch_size",
    "settings.step_profile.gradient_accumulation_steps",
)


@dataclass
class ResumePlan:
    checkpoint: Path  # verified checkpoint folder
    source_run: Path  # the run folder the checkpoint belongs to
    run_dir: Path | None  # where training continues: the source run, or a new run folder (None until created)
    new_run: bool  # a new --experiment_id: a new run folder starts from the source run's checkpoint
    changes: list[str] = field(default_factory=list)  # differences allowed by --allow_config_change


# --- which run, which checkpoint ------------------------------------------------------------------------------
def locate(resume_from: str, experiments_root: Path, experiment_id: str | None) -> ResumePlan:
    """The checkpoint `--resume_from` names and the run it belongs to. A different `--experiment_id` than that
    run's folder name makes a new run (`new_run`): `lorafit run` creates it, the source run is only read."""
    if resume_from != "latest":
        path = Path(resume_from)
        if path.is_symlink() and not path.exists():
            raise UserError(f"--resume_from: {path} is a broken link to {os.readlink(path)}")
        if not path.exists():
            raise UserError(f"--resume_from: {path} does not exist; pass 'latest', a run folder or a checkpoint folder")
        if (path / "checkpoints").is_dir():
            source, checkpoint = path, _latest(path)
        elif path.parent.name == "checkpoints":
            source, checkpoint = path.parent.parent, _verified(path)
        else:
            raise UserError(
                f"--resume_from: {path} is neither a run folder (with checkpoints/) nor a checkpoint folder"
            )
        new_run = experiment_id is not None and experiment_id != source.name
        return ResumePlan(checkpoint, source, None if new_run else source, new_run)
    if experiment_id:
        source = Path(experiments_root) / experiment_id
        if not source.is_dir():
            raise UserError(f"--resume_from latest: no run folder {source}")
    else:
        runs = sorted(
            (p for p in Path(experiments_root).glob("*/checkpoints") if p.is_dir()), key=lambda p: p.stat().st_mtime
        )
        if not runs:
            raise UserError(f"--resume_from latest: no run with checkpoints under {experiments_root}")
        source = runs[-1].parent
    return ResumePlan(_latest(source), source, source, new_run=False)


def _latest(run_dir: Path) -> Path:
    path = find_latest(run_dir)
    if path is None:
        folder = Path(run_dir) / "checkpoints"
        found = [f"{p.name}: {verify_checkpoint(p)}" for _, p in list_checkpoints(run_dir)]
        why = (
            "; ".join(found)
            if found
            else "the run stopped before its first checkpoint, so there is nothing to continue: start it again with "
            f"another --experiment_id, or delete {run_dir} and reuse its id"
        )
        raise UserError(f"--resume_from latest: no complete checkpoint under {folder} ({why})")
    return path


def _verified(path: Path) -> Path:
    problem = verify_checkpoint(path) if path.is_dir() else "not found"
    if problem:
        raise UserError(f"cannot resume from {path}: {problem}")
    return path


def resolve_checkpoint(run_dir: Path, resume_from: str | Path | None) -> Path | None:
    """For the loop: None (fresh start), 'latest' (of `run_dir`), or a checkpoint path (must verify)."""
    if resume_from is None:
        return None
    return _latest(run_dir) if str(resume_from) == "latest" else _verified(Path(resume_from))


# --- may this config continue it? ----------------------------------------------------------------------------
def check_continuation(
    plan: ResumePlan,
    old_config: dict[str, Any],
    new_config: dict[str, Any],
    world_size: int,
    sources: dict[str, str],
    allow: bool,
) -> ResumePlan:
    """Every difference between the checkpoint's training and this one: refused (one message listing all), or
    with `allow` recorded in `plan.changes` (and applied by `restore`)."""
    trainer = read_trainer_state(plan.checkpoint)
    diffs = config_differences(old_config, new_config)
    diffs += _global_batch_difference(trainer, old_config, new_config, world_size)
    diffs += _source_differences(trainer.get("sources"), sources)
    if diffs and not allow:
        listing = "\n".join(f"  - {d}" for d in diffs[:30])
        raise UserError(
            f"refusing to resume {plan.source_run}: the config changes what was trained:\n{listing}\n"
            "Resume with the original config (and data), or pass --allow_config_change to continue with the "
            "changes applied."
        )
    plan.changes = diffs
    return plan


def config_differences(old: Any, new: Any, path: str = "") -> list[str]:
    if path in MAY_CHANGE or path in BATCH_SPLIT:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if sub in MAY_CHANGE or sub in BATCH_SPLIT:
                continue
            if key not in old:
                out.append(f"{sub}: added ({new[key]!r})")
            elif key not in new:
                out.append(f"{sub}: removed (was {old[key]!r})")
            else:
                out += config_differences(old[key], new[key], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [d for i, (a, b) in pairs for d in config_differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _batch_split(config: dict[str, Any]) -> tuple[int, int]:

    raw = settings_of(config).get("step_profile") or {}
    try:
        sp = StepProfile.model_validate(raw)
    except Exception:  # the checks of the config itself report this; here only the product matters
        sp = StepProfile()
    return sp.local_train_micro_batch_size, sp.gradient_accumulation_steps


def _global_batch_difference(
    trainer: dict[str, Any], old_config: dict[str, Any], new_config: dict[str, Any], world_size: int
) -> list[str]:
    old_micro, old_accum = _batch_split(old_config)
    old_world = int(trainer.get("world_size", 1))
    old_global = int(trainer.get("global_batch_size") or old_micro * old_accum * old_world)
    micro, accum = _batch_split(new_config)
    new_global = micro * accum * world_size
    if new_global == old_global:
        return []
    way_out = ""
    if old_global % (micro * world_size) == 0:
        way_out = (
            f"; settings.step_profile.gradient_accumulation_steps: {old_global // (micro * world_size)} keeps "
            f"it on {world_size} process(es)"
        )
    elif old_global % world_size == 0:
        way_out = (
            f"; settings.step_profile.local_train_micro_batch_size: {old_global // world_size} with "
            f"gradient_accumulation_steps: 1 keeps it on {world_size} process(es)"
        )
    return [
        f"global batch (samples per step): {old_global} -> {new_global} (the checkpoint: micro batch {old_micro} x "
        f"accumulation {old_accum} x {old_world} process(es); this run: {micro} x {accum} x {world_size}){way_out}"
    ]


def source_fingerprints(config: dict[str, Any]) -> dict[str, str]:
    """sha256 of every file the training data is read from: `{yaml path: digest}`.

    Walks the `train_dataset` entity (following references) for string values naming existing files, so an edited
    training file is told apart from the one a checkpoint was trained on, even with the same number of samples."""
    found: dict[str, str] = {}

    def walk(node: Any, path: str, seen: frozenset[str]) -> None:
        if isinstance(node, dict):
            ref = node.get("instance_key")
            if isinstance(ref, str) and "pass_type" in node and ref in config and ref not in seen:
                walk(config[ref], ref, seen | {ref})
                return
            for key, value in node.items():
                walk(value, f"{path}.{key}", seen)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]", seen)
        elif isinstance(node, str) and len(node) < 4096:
            file = Path(node)
            try:
                is_file = file.is_file()
            except OSError:  # a name too long or otherwise not a path
                return
            if is_file:
                found[path] = file_sha256(file)

    if "train_dataset" in config:
        walk(config["train_dataset"], "train_dataset", frozenset({"train_dataset"}))
    return found


def _source_differences(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    if old is None:  # a checkpoint written before sources were recorded
        return []
    return [
        f"{path}: the file changed since the checkpoint (sha256 {old.get(path, 'none')[:12]} -> "
        f"{new.get(path, 'none')[:12]})"
        for path in sorted(set(old) | set(new))
        if old.get(path) != new.get(path)
    ]


# --- putting the state back ------------------------------------------------------------------------------------
@dataclass
class Restored:
    step: int
    tokens: int
    elapsed_s: float


def restore(
    checkpoint: Path,
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: Any,
    env: Any,
) -> Restored:
    """Load `checkpoint` into the wrapped model, optimizer, scheduler and sampler (collective: every rank calls).

    The optimizer's moments and the schedule's position come from the checkpoint; the hyper-parameters (lr,
    betas, weight decay, the schedule's shape and length) from this run's config, so a change allowed by
    `--allow_config_change` takes effect from the next step, and with no change they are the same values."""
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    fresh_schedule = scheduler.state_dict()
    trainer = load_checkpoint(checkpoint, model, optimizer, env)
    saved_schedule = trainer["scheduler"]
    for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
        group.update(fresh)
    # this run's schedule at the checkpoint's position: one step() from the step before sets every group's lr
    scheduler.load_state_dict(
        {
            **fresh_schedule,
            "last_epoch": saved_schedule["last_epoch"] - 1,
            "_step_count": max(2, saved_schedule.get("_step_count", 2)),
        }
    )
    scheduler.step()

    same_world = trainer.get("world_size") == env.world_size
    if not same_world:
        warn(
            f"{checkpoint} was written by {trainer.get('world_size')} processes, this run has {env.world_size}: "
            "random states (e.g. dropout) start fresh; weights, optimizer and data order resume"
        )
    sampler.load_state_dict(trainer["sampler"])
    if same_world:
        rng = trainer.get("rng")
        if rng is not None:
            restore_rng(rng)
    if env.is_main and Path(checkpoint).parent.parent.resolve() == Path(run_dir).resolve():
        supersede_after(run_dir, trainer["step"])
    info(f"resumed from {checkpoint} (step {trainer['step']})")
    return Restored(trainer["step"], trainer["tokens"], trainer["elapsed_s"])


def supersede_after(run_dir: Path, step: int) -> list[Path]:
    """Rename checkpoints newer than `step` (a run resumed from an earlier one makes them a discarded future)
    to `<name>.superseded-<time>`: kept for the user, never picked by `find_latest` nor pruned."""
    moved = []
    for later_step, path in list_checkpoints(run_dir):
        if later_step > step:
            target = path.with_name(f"{path.name}.superseded-{int(time.time())}")
            path.rename(target)
            warn(f"resumed from step {step}: the later checkpoint {path.name} is set aside as {target.name}")
            moved.append(target)
    return moved


__all__ = [
    "MAY_CHANGE",
    "TRAINER_STATE",
    "Restored",
    "ResumePlan",
    "check_continuation",
    "config_differences",
    "locate",
    "resolve_checkpoint",
    "restore",
    "source_fingerprints",
    "supersede_after",
]
