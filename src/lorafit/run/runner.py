"""`lorafit run`: one run from a config, the same code on one process or under torchrun.

Order: process group -> one experiment id for all ranks -> resolve + check the config (every rank, so every rank
fails the same way) -> run folder (rank 0 creates; never overwritten) -> build -> evaluate the base ->
train -> evaluate the result -> export. Evaluators and exports run on rank 0 only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit import allocator
from lorafit.atomic import write_atomic
from lorafit.checkpoint import resume
from lorafit.config.loader import ConfigEnv
from lorafit.console import info, warn
from lorafit.distributed.env import init_distributed
from lorafit.distributed.parallel import DDPStrategy, FSDP2Strategy, Strategy
from lorafit.errors import UserError
from lorafit.lora import has_lora
from lorafit.lora.provenance import annotate_adapter, prompt_format_of, record_merge
from lorafit.outputs.merged import export_merged
from lorafit.run.build import BuiltRun, build_run, load_run_config, run_outline
from lorafit.run.experiment import CONFIG_COPY, RESOLVED_CONFIG, create_run_dir, default_experiment_id, read_resolved
from lorafit.run.report import render_report
from lorafit.training.job import TrainJob
from lorafit.training.loop import train as train_loop
from lorafit.training.memory import refuse_if_too_big
from lorafit.training.metrics import append_metrics
from lorafit.training.trackers import open_trackers, scalars


@dataclass
class RunRequest:
    config_file_path: Path
    experiments_root_path: Path = Path("experiments")
    experiment_id: str | None = None
    resume_from: str | None = None
    allow_config_change: bool = False
    overrides: tuple[str, ...] = ()  # `key.path=value` from the command line, applied before resolving


def run(request: RunRequest) -> Path:
    dist_env = init_distributed()
    try:
        return _run(request, dist_env)
    finally:
        # gloo's worker threads must stop while the interpreter is still whole: a process that exits with the group
        # up (e.g. on a user error) can abort at finalisation, SIGABRT instead of exit code 2 (pytorch#190489)
        dist_env.destroy()


def _run(request: RunRequest, dist_env) -> Path:
    config_path = Path(request.config_file_path)
    if not config_path.is_file():
        raise UserError(f"config file not found: {config_path}")
    root = Path(request.experiments_root_path)

    plan = None
    if request.resume_from:
        plan = dist_env.on_main(resume.locate, request.resume_from, root, request.experiment_id)
        experiment_id = request.experiment_id or plan.source_run.name
    else:
        experiment_id = dist_env.on_main(lambda: request.experiment_id or default_experiment_id(config_path, root))
    env = ConfigEnv(
        experiment_id=experiment_id,
        config_file_path=str(config_path),
        config_folder_path=str(config_path.parent),
        experiments_root_path=str(root),
    )
    config, graph = load_run_config(config_path, env, request.overrides)
    root = _run_root(config, root, request)
    sources = dist_env.on_main(resume.source_fingerprints, config)
    _check_allocator(config)

    if plan is not None:
        plan = dist_env.on_main(_check_and_place, plan, config, dist_env.world_size, sources, request, root)
        run_dir = plan.run_dir
        for change in plan.changes:
            info(
                f"resuming with a changed config (allowed, applied from step {_step_of(plan.checkpoint) + 1}): {change}"
            )
        if plan.new_run:
            info(f"new run {run_dir} continues from {plan.checkpoint} ({plan.source_run} is left as it is)")
    else:
        run_dir = dist_env.on_main(create_run_dir, root, experiment_id, config_path, config, request.overrides)
    info(f"run folder: {run_dir}")
    info(f"memory allocator: {allocator.active()} (lorafit run --allocator tbbmalloc|system)")

    trackers: list = []  # rank 0's; a tracker that cannot start stops every rank with its error (no rank hangs)
    try:
        built = build_run(graph, world_size=dist_env.world_size)
        if dist_env.world_size > 1 and is_single_process_strategy(built.parallelism):
            raise UserError(
                f"parallelism: 'none' with {dist_env.world_size} processes would train {dist_env.world_size} "
                "unsynchronised copies; use variant_key fsdp2 or ddp (or leave parallelism out: fsdp2 under torchrun)",
            )
        refuse_if_too_big(built, config, dist_env)  # predicted peak memory vs the machine's (training/memory.py)
        dist_env.on_main(
            lambda: trackers.extend(open_trackers(built.settings.loggers, run_dir, experiment_id, run_config=config))
        )
    except UserError:
        if (plan is None or plan.new_run) and dist_env.rank == 0:
            discard_unused_run_dir(run_dir)  # so the same --experiment_id works once the problem is fixed
        raise
    try:
        if not request.resume_from:
            run_evaluators(built, run_dir, "before", dist_env, trackers)
        result = train(built, run_dir, dist_env, plan.checkpoint if plan else None, sources, trackers)
        run_evaluators(built, run_dir, "after", dist_env, trackers, trained=result)
    finally:
        for tracker in trackers:
            tracker.close()
    if dist_env.rank == 0:
        export(built, run_dir, result)
        write_report(run_dir, result)
    dist_env.barrier()
    return run_dir


def _run_root(config: dict[str, Any], root: Path, request: RunRequest) -> Path:
    """Where the run folder goes: the root the config's layout names (Modalities': its checkpoint_path, where it
    keeps the experiment as checkpoint_path/<experiment_id>/), unless --experiments_root_path names another."""
    found = run_outline(config).run_root
    if found is None or request.experiments_root_path != Path("experiments"):
        return root
    return found


def discard_unused_run_dir(run_dir: Path) -> None:
    """Remove a run folder this call created, if it still holds only the config copies."""

    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {CONFIG_COPY, RESOLVED_CONFIG}:
        for name in (CONFIG_COPY, RESOLVED_CONFIG):
            (run_dir / name).unlink(missing_ok=True)
        run_dir.rmdir()


def is_single_process_strategy(strategy) -> bool:
    return isinstance(strategy, Strategy) and not isinstance(strategy, (DDPStrategy, FSDP2Strategy))


def _check_allocator(config: dict[str, Any]) -> None:
    """The allocator is chosen by the `lorafit` program at start from --allocator or LORAFIT_MALLOC
    (lorafit/allocator.py); the Python API never changes its process's allocator. A config's `settings.allocator`
    (run folders of earlier lorafit versions recorded it there) chooses nothing: said when it names another. The
    record of what ran is a comment on top of config.resolved.yaml (run/experiment.write_resolved), not a key: a
    key would make a Modalities config's resolved copy one that Modalities refuses."""
    settings = config.get("settings")
    asked = settings.get("allocator") if isinstance(settings, dict) else None
    used = allocator.active()
    if asked and asked != used:
        warn(
            f"settings.allocator: {asked} records the allocator a run ran under and chooses none; this process runs "
            f"under {used} (choose with `lorafit run --allocator {asked}` or LORAFIT_MALLOC={asked})"
        )


def _check_and_place(plan, config, world_size: int, sources: dict[str, str], request: RunRequest, root: Path):
    """Rank 0: refuse a resume that would not continue the same training; a new run folder for a new id."""
    plan = resume.check_continuation(
        plan, read_resolved(plan.source_run), config, world_size, sources, request.allow_config_change
    )
    if plan.new_run:
        plan.run_dir = create_run_dir(
            root, request.experiment_id, Path(request.config_file_path), config, request.overrides
        )
    return plan


def _step_of(checkpoint: Path) -> int:
    return int(Path(checkpoint).name.split("_")[-1])


def train(built: BuiltRun, run_dir: Path, dist_env, checkpoint: Path | None, sources: dict[str, str], trackers=None):
    """Hand the built entities and the settings to the training loop."""

    job = TrainJob(
        model=built.model,
        tokenizer=built.tokenizer,  # saved into model/ after full fine-tuning
        train_dataset=built.train_dataset,
        optimizer_factory=built.optimizer,
        scheduler_factory=built.scheduler,
        env=dist_env,
        run_dir=run_dir,
        settings=built.settings,
        eval_datasets=built.eval_datasets,
        parallelism=built.parallelism,
        fill_weights_after_sharding=built.fill_weights_after_sharding,  # a meta-device build (fsdp2)
        resume_from=checkpoint,
        # evaluators and the merged export need the whole model on rank 0 after a sharded run
        gather_full_model=dist_env.world_size > 1 and bool(built.evaluators or built.settings.export.merged_model),
        source_fingerprints=sources,
        trackers=trackers,
        shuffle=built.shuffle,
        samples_per_epoch=built.samples_per_epoch,
        eval_batch_sizes=built.eval_batch_sizes,
        eval_loss=built.eval_loss,
        eval_at_start=built.eval_at_start,
        progress=built.progress,
        loss_normalization=built.loss_normalization,
    )
    return train_loop(job)


def run_evaluators(
    built: BuiltRun, run_dir: Path, when: str, dist_env, trackers=(), trained=None
) -> dict[str, Any] | None:
    """Run the evaluators on rank 0 with the unmerged model (`when` = before/after training); their numbers go
    to eval_<when>.json, metrics.jsonl and every tracker (step 0 before training, the last step after)."""
    if not built.evaluators:
        return None
    results: dict[str, Any] | None = None
    if dist_env.rank == 0:
        model = built.model if trained is None else trained.model_for_eval()
        results = {}
        for i, evaluator in enumerate(built.evaluators):
            name = getattr(evaluator, "name", f"evaluator_{i}")
            results[name] = evaluator.run(model, built.tokenizer)
            info(
                f"[{when} training] {name}: "
                + ", ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in results[name].items()
                    if isinstance(v, (int, float))
                )
            )
        write_atomic(run_dir / f"eval_{when}.json", json.dumps(results, indent=2, default=str))
        log_evaluator_results(run_dir, results, trained.steps if trained is not None else 0, trackers)
    dist_env.barrier()
    return results


def log_evaluator_results(run_dir: Path, results: dict[str, Any], step: int, trackers) -> None:
    record = {"step": step}
    for name, values in results.items():
        record |= {f"evaluator/{name}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
    append_metrics(run_dir, record)
    for tracker in trackers:
        tracker.log(scalars(record), step)


def export(built: BuiltRun, run_dir: Path, result) -> None:
    if result.adapter_dir is not None:  # how it was trained, for `lorafit generate` (lorafit/lora/provenance.py)
        annotate_adapter(
            result.adapter_dir, prompt_format_of(built.train_dataset), built.settings.export.base_model_name_or_path
        )
    if built.settings.export.merged_model and not has_lora(result.model_for_eval()):
        info("export.merged_model: nothing to merge (full fine-tuning); model/ is already a plain Hugging Face folder")
    elif built.settings.export.merged_model:
        # merged/ is this run's own output (a resumed run writes it again from the newer adapter)
        export_merged(result.model_for_eval(), built.tokenizer, run_dir / "merged", overwrite=True)
        if result.adapter_dir is not None:
            base = getattr(getattr(built.model, "config", None), "_name_or_path", "")
            record_merge(run_dir / "merged", result.adapter_dir, base)
        info(f"merged model: {run_dir / 'merged'}")


def write_report(run_dir: Path, result) -> None:
    text = render_report(run_dir, result)
    write_atomic(run_dir / "report.md", text)
    info(text)
