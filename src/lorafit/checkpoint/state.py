"""Resumable training checkpoints: the trainable parameters (LoRA: the adapters, never the frozen base; full
fine-tuning: the whole model), the optimizer, and the trainer's counters, sampler position, scheduler and RNG
states.

Layout, under `<run_dir>/checkpoints/`:

    step_000010/
      .metadata, __0_0.distcp, ...   torch.distributed.checkpoint (DCP) of {model: trainable, optim: AdamW state}
      trainer_state.pt              rank 0: step, tokens, sampler, scheduler, world size, config hash
      rng_rank_00000.pt ...         each rank's torch / cuda / numpy / python RNG states
      COMPLETE                      written last: JSON with the step and the sha256 of every other file

Writing is atomic: everything goes to `step_000010.tmp/`, COMPLETE is written last, then the folder is renamed.
A process killed while writing leaves only a `.tmp` folder, which is ignored and cleaned up by the next save;
the older checkpoints are untouched. `find_latest` checks the checksums and skips (with a warning) a
checkpoint that is incomplete or damaged, falling back to the one before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorafit.atomic import own_folder, publish_folder
from lorafit.console import warn
from lorafit.distributed.env import DistEnv
from lorafit.errors import UserError
from lorafit.models.wrappers import canonical_name, unwrap

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
_NAME = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen base weights are not saved: they come from the base model at every start
    return StateDictOptions(ignore_frozen_params=True)


def _trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with the trainable parameters only, each parameter under one name.

    LoRA: the adapters. `ignore_frozen_params` still lets a tied frozen weight through under its second name
    (lm_head.weight = embed_tokens.weight: the whole embedding table), so the keys are filtered explicitly.
    Full fine-tuning: the whole model; a tied trainable weight is saved once, under its first name
    (embed_tokens), and loading it there restores the head too, since it is the same parameter.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    trainable = {canonical_name(n) for n, p in unwrap(model).named_parameters() if p.requires_grad}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd


# --- RNG --------------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's RNG states, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": [version, list(py_state), gauss],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


# --- integrity --------------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: Path) -> str | None:
    """None if `path` is a complete, undamaged checkpoint; otherwise what is wrong with it."""
    marker = Path(path) / COMPLETE
    if not marker.is_file():
        return "incomplete (no COMPLETE marker: the write was interrupted)"
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
    except (ValueError, KeyError, TypeError):
        return "damaged COMPLETE marker"
    for name, expected in files.items():
        file = Path(path) / name
        if not file.is_file():
            return f"file {name} is missing"
        if file_sha256(file) != expected:
            return f"file {name} does not match its checksum"
    # the checksums only say the files are the ones the writer listed: whoever wrote them chose their content
    from lorafit.checkpoint.dcp_metadata import metadata_problem  # deferred: DCP (~1 s) only for resuming

    return metadata_problem(path)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished-looking checkpoint folder, oldest first (not verified)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def find_latest(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged or incomplete newer ones are skipped with a warning."""
    for _step, path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}; trying the previous one")
    return None


# --- save / load ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_single_process(env: DistEnv) -> Iterator[None]:
    # DCP warns that it "assumes a single process" when no process group exists: that is the intent here
    with warnings.catch_warnings():
        if not env.distributed:
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    env: DistEnv,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically (collective: every rank calls); keep the `keep_last` newest."""
    import torch.distributed.checkpoint as dcp

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if env.is_main:
        own_folder(final.parent, "the run folder's checkpoints")  # a link there would take the checkpoints elsewhere
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    env.barrier()
    model_sd, optim_sd = _trainable_state(model, optimizer)
    with _quiet_single_process(env):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not env.distributed)
    torch.save(capture_rng(), tmp / f"rng_rank_{env.rank:05d}.pt")
    if env.is_main:
        torch.save({**trainer_state, "step": step, "world_size": env.world_size}, tmp / TRAINER_STATE)
    env.barrier()  # every rank's files are in tmp
    if env.is_main:
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        for name in files:
            _fsync(tmp / name)
        marker = tmp / (COMPLETE + ".part")
        marker.write_text(json.dumps({"step": step, "time": time.time(), "files": files}, indent=1))
        _fsync(marker)
        marker.rename(tmp / COMPLETE)
        publish_folder(tmp, final)  # replaces a checkpoint of a superseded future (resumed from an earlier step)
        _fsync(final.parent)
        _prune(run_dir, keep_last, keep=final)
    env.barrier()
    return final


def _prune(run_dir: Path, keep_last: int, keep: Path) -> None:
    complete = [p for _, p in list_checkpoints(run_dir) if (p / COMPLETE).is_file()]
    for path in complete[:-keep_last] if keep_last > 0 else complete:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """Load the trainable parameters + optimizer into the (wrapped) model; returns the trainer state with this
    rank's RNG states under "rng" (None when the checkpoint has none for this rank). `lorafit.checkpoint.resume.restore`
    decides what to do with them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from lorafit.checkpoint import dcp_metadata  # deferred: as above

    path = Path(path)
    # a refused file is said as itself, not as the config mismatch the except below reports
    if problem := dcp_metadata.metadata_problem(path):
        raise UserError(f"cannot resume from {path}: {problem}")
    model_sd, optim_sd = _trainable_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with _quiet_single_process(env):
            dcp.load(
                state,
                storage_reader=dcp_metadata.SafeFileSystemReader(path),
                planner=dcp_metadata.SafeLoadPlanner(),
                no_dist=not env.distributed,
            )
    except (Exception, CheckpointException) as error:  # a shape or a key differs: another LoRA r or targets
        # CheckpointException (a BaseException) carries each rank's traceback as text: its last line is the cause
        text = str(error).strip().splitlines()
        if any("not a plain value" in line or "UnpicklingError" in line for line in text):  # the planner refused
            raise UserError(
                f"cannot resume from {path}: refused to load a value of its data files "
                f"({text[-1]}); a pickle that would run code is never loaded"
            ) from None
        raise UserError(
            f"cannot resume from {path}: it does not fit this run's trainable parameters "
            f"({text[-1] if text else type(error).__name__}); was it written with another LoRA r or "
            "target_layers? Resume with the config it was written with"
        ) from None
    # strict=False because the frozen base is (by design) not in the checkpoint; trainable keys are checked here
    loaded = set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=replace(_options(), strict=False),
    )
    trainable = set(state["model"])
    missing = sorted(k for k in loaded.missing_keys if k in trainable)
    if missing or loaded.unexpected_keys:
        unexpected = loaded.unexpected_keys[:5]
        raise UserError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected}")
    trainer = read_trainer_state(path)
    rng_file = path / f"rng_rank_{env.rank:05d}.pt"
    trainer["rng"] = _load_plain(rng_file) if rng_file.is_file() else None
    return trainer


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path` (step, tokens, sampler, scheduler, world size, global batch, ...)."""
    return _load_plain(Path(path) / TRAINER_STATE)


def _load_plain(file: Path) -> Any:
    """A small torch.save'd file of plain values; anything else (a pickle that would run code) is refused."""
    try:
        return torch.load(file, weights_only=True)
    except Exception as error:  # UnpicklingError for a crafted file; EOFError / RuntimeError for a damaged one
        reason = "it would run pickled code" if isinstance(error, pickle.UnpicklingError) else "it is damaged"
        raise UserError(
            f"cannot resume from {file.parent}: refused to load {file.name} ({reason}); resume from another checkpoint"
        ) from None


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
