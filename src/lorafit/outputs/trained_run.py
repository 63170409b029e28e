"""A lorafit run read back for an export: its model with the adapters it trained, its id, steps and tokens.

`path` names the run folder (`<root>/<experiment_id>/`, holding `config.resolved.yaml`), its `adapter/`, or one of
its `checkpoints/step_N/`. The base model is the run config's model entity (lorafit's `model`; the caller names the
entities another layout uses), built from the resolved config with its weights, unless `base` names a base folder
or another config. The adapters are the run's final `adapter/` (PEFT's format), or a checkpoint's (its DCP files):
the one named, or the latest when the run has no `adapter/` (stopped before its end). A full fine-tuning run's `model/`
folder is the trained model itself.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from lorafit.checkpoint.state import CHECKPOINTS, find_latest, read_trainer_state, verify_checkpoint
from lorafit.checkpoint.trained_weights import ADAPTER_DIR, MODEL_DIR
from lorafit.errors import UserError
from lorafit.lora import load_adapter
from lorafit.models.wrappers import canonical_name, unwrap
from lorafit.outputs.inference import load_base, load_with_adapter
from lorafit.run.build import build_run_entities
from lorafit.run.experiment import RESOLVED_CONFIG

MODEL_ENTITIES = ("model",)  # the entity a lorafit config trains


@dataclass(frozen=True)
class TrainedRun:
    """Where a run's trained weights are (found without loading anything) and how far it trained."""

    run_dir: Path
    experiment_id: str
    steps: int
    tokens: int
    kind: str  # "model" (full fine-tuning: run_dir/model/), "adapter" (run_dir/adapter/) or "checkpoint"
    source: Path  # that folder


def _run_folder(path: Path) -> tuple[Path, Path | None]:
    """(the run folder, the checkpoint named by `path` or None)."""
    if (path / RESOLVED_CONFIG).is_file():
        return path, None
    if path.name == ADAPTER_DIR and (path.parent / RESOLVED_CONFIG).is_file():
        return path.parent, None
    if path.parent.name == CHECKPOINTS and (path.parents[1] / RESOLVED_CONFIG).is_file():
        return path.parents[1], path
    raise UserError(
        f"--run: {path} is not a lorafit run folder (no {RESOLVED_CONFIG}), nor its {ADAPTER_DIR}/ or "
        f"a {CHECKPOINTS}/step_N/ folder of one"
    )


def _base_model(config_or_folder: Path, entities: tuple[str, ...]) -> nn.Module:
    if config_or_folder.suffix not in (".yaml", ".yml"):
        return load_base(config_or_folder, flag="--model")[0]
    with _without_run_records(config_or_folder) as config:
        built = build_run_entities(config, list(entities))
    model = next((built[name] for name in entities if name in built), None)
    if not isinstance(model, nn.Module):
        raise UserError(
            f"{config_or_folder}: no model entity ({' or '.join(entities)}) to rebuild the run's "
            "model from; name the base with --model"
        )
    return model


@contextlib.contextmanager
def _without_run_records(config: Path) -> Iterator[Path]:
    """`config`, or a temporary copy without what earlier lorafit runs recorded into their config.resolved.yaml
    for the program (`settings.allocator`; now a comment, lorafit/allocator.py): another layout's settings block
    (Modalities') has no such key and refuses it."""
    resolved = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings = resolved.get("settings") if isinstance(resolved, dict) else None
    if not isinstance(settings, dict) or "allocator" not in settings:
        yield config
        return
    del settings["allocator"]
    with tempfile.TemporaryDirectory(prefix="lorafit-export-") as folder:
        copy = Path(folder) / config.name
        copy.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        yield copy


def load_checkpoint_adapters(checkpoint: Path, model: nn.Module) -> None:
    """The LoRA parameters of a lorafit checkpoint (its DCP `model` part) loaded into `model`'s LoRA layers."""
    import torch.distributed.checkpoint as dcp

    from lorafit.checkpoint import dcp_metadata  # deferred: DCP (~1 s) only for a run without its final adapter/

    if problem := verify_checkpoint(checkpoint) or dcp_metadata.metadata_problem(checkpoint):
        raise UserError(f"--run: cannot read {checkpoint}: {problem}")
    params = {canonical_name(n): p.detach() for n, p in unwrap(model).named_parameters() if ".lora_" in n}
    if not params:
        raise UserError(f"--run: the model built from the run's config has no LoRA layers to load {checkpoint} into")
    try:
        with torch.no_grad(), warnings.catch_warnings():  # "assuming ... a single process": that is the intent
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(
                {"model": params},
                storage_reader=dcp_metadata.SafeFileSystemReader(checkpoint),
                planner=dcp_metadata.SafeLoadPlanner(),
                no_dist=True,
            )
    except BaseException as error:  # DCP's CheckpointException (a BaseException) names the key that does not fit
        if isinstance(error, KeyboardInterrupt):
            raise
        last = str(error).strip().splitlines()[-1:] or [type(error).__name__]
        raise UserError(f"--run: {checkpoint} does not fit the run's LoRA layers ({last[0]})") from None


def find_trained_run(path: str | Path) -> TrainedRun:
    """The run `path` names and where its trained weights are; nothing is loaded (errors come before minutes)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--run: {path} does not exist")
    run_dir, checkpoint = _run_folder(path)
    latest = checkpoint or find_latest(run_dir)
    state = read_trainer_state(latest) if latest is not None else {}
    if checkpoint is None and (run_dir / MODEL_DIR / "config.json").is_file():
        kind, source = "model", run_dir / MODEL_DIR
    elif checkpoint is None and (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        kind, source = "adapter", run_dir / ADAPTER_DIR
    elif latest is not None:
        kind, source = "checkpoint", latest
    else:
        raise UserError(
            f"--run: {run_dir} has neither a final {ADAPTER_DIR}/ nor a checkpoint (it stopped before its first one)"
        )
    return TrainedRun(
        run_dir=run_dir,
        experiment_id=run_dir.name,
        steps=int(state.get("step", 0)),
        tokens=int(state.get("tokens", 0)),
        kind=kind,
        source=source,
    )


def load_trained_model(
    run: TrainedRun, base: str | Path | None = None, entities: tuple[str, ...] = MODEL_ENTITIES
) -> nn.Module:
    """The run's model with what it trained (eval mode): the base (`base`, else the run's config's first entity of
    `entities`) + its adapters."""
    if run.kind == "model":  # full fine-tuning: the trained model itself
        return load_with_adapter(run.source, None, flag="--run")[0]
    model = _base_model(Path(base) if base is not None else run.run_dir / RESOLVED_CONFIG, entities)
    if run.kind == "adapter":
        load_adapter(model, run.source)
    else:
        load_checkpoint_adapters(run.source, model)
    return model.eval()


__all__ = ["MODEL_ENTITIES", "TrainedRun", "find_trained_run", "load_checkpoint_adapters", "load_trained_model"]
