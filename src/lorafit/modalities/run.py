"""A Modalities training config (it has a top-level `train_dataloader`) as a lorafit run: checked, built, and
handed to the same runner and training loop as native configs.

The entities are Modalities' (`TrainingComponentsInstantiationModel` of the `lora` branch): wrapped_model,
optimizer, scheduler, loss_fn, train_dataloader, eval_dataloaders, batch_progress_subscriber,
evaluation_subscriber, checkpoint_saving, gradient_clipper and settings; every other top-level entry is a named
component they may reference. Settings come in both Modalities layouts:

- `settings.training.{gradient_acc_steps, local_train_micro_batch_size, sequence_length, *_interval_in_steps,
  global_num_seen_tokens, activation_checkpointing_modules}` (the `lora` branch): one pass over the train data loader,
  so steps = (micro-batches per rank) // gradient_acc_steps;
- `settings.{step_profile, intervals, training_target, consistency_enforcement, training_progress}`
  (modalities 0.5.0): steps = training_target.num_target_steps (Modalities' consistency checks applied).

Global batch = local_train_micro_batch_size x gradient_acc_steps x world size samples of sequence_length tokens.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lorafit.config.graph import ConfigGraph, component_blocks, is_component, is_reference, pydantic_problems
from lorafit.config.layouts import BuiltRun
from lorafit.config.run_spec import Checkpointing, Intervals, RunSettings, StepProfile, TrainingTarget
from lorafit.console import info
from lorafit.distributed.parallel import decoder_blocks
from lorafit.errors import ConfigError, Problem, UserError, did_you_mean
from lorafit.modalities.data import ModalitiesLoader
from lorafit.modalities.no_effect import say_keys_without_effect
from lorafit.modalities.settings import ModalitiesSettings, NewProgress, settings_problems
from lorafit.modalities.sharding import ModalitiesGraph, translate, wrapped_model_block
from lorafit.modalities.tokenizer import unwrap_tokenizer
from lorafit.modalities.training import check_block_names, say_not_honoured
from lorafit.models.deferred import deferred_init
from lorafit.training.trackers import LoggersConfig, WandbConfig

ENTITIES = {
    "wrapped_model": "model",
    "optimizer": "optimizer",
    "scheduler": "scheduler",
    "loss_fn": "loss",
    "train_dataloader": "data_loader",
    "batch_progress_subscriber": "progress_subscriber",
    "evaluation_subscriber": "results_subscriber",
    "checkpoint_saving": "checkpoint_saving",
    "gradient_clipper": "gradient_clipper",
}


# The progress subscriber's entity name: lora branch / lora_2 branch and modalities 0.5.0
PROGRESS = ("batch_progress_subscriber", "progress_subscriber")
# app_state/raw (modalities 0.5.0) holds these three entities as model, optimizer and lr_scheduler
APP_STATE = {"wrapped_model": "model", "optimizer": "optimizer", "scheduler": "lr_scheduler"}


def entities_of(config: dict[str, Any]) -> dict[str, str]:
    """The entities this config's Modalities version has: name -> component_key."""
    entities = dict(ENTITIES)
    if PROGRESS[1] in config and PROGRESS[0] not in config:
        del entities[PROGRESS[0]]
        entities[PROGRESS[1]] = "progress_subscriber"
    if "app_state" in config:
        for key in APP_STATE:
            del entities[key]
        entities["app_state"] = "app_state"
    if "device_mesh" in config:
        entities["device_mesh"] = "device_mesh"
    return entities


# ------------------------------------------------------------------------------------------------ checking
def inline_list_references(config: dict[str, Any]) -> dict[str, Any]:
    """Modalities lets a reference name any top-level entity, also a list (`eval_dataloaders: [refs]`, referenced
    by the progress subscriber); lorafit's graph references components, so such a reference becomes the list."""
    lists = {k: v for k, v in config.items() if isinstance(v, list) and all(is_reference(e) for e in v)}

    def walk(value: Any) -> Any:
        if is_reference(value) and value.get("instance_key") in lists:
            return list(lists[value["instance_key"]])
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return {k: (walk(v) if k not in lists else v) for k, v in config.items()} if lists else config


def fold_numbers(config: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Every inline `number_conversion` component that gives a number replaced by that number, innermost first.

    Modalities builds them where they stand, also inside `settings` (training_target.num_target_steps...), and
    interpolation copies them into other components (scheduler total_steps); they are pure arithmetic (one reads
    a .pbin's length), so lorafit computes them before checking, and `lorafit validate` shows the real numbers."""
    problems: list[Problem] = []
    graph = ConfigGraph(config)

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        value = {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if not (is_component(value) and value.get("component_key") == "number_conversion"):
            return value
        try:
            number = graph.build_value(value, path)
        except UserError as e:
            problems.extend(e.problems or [Problem(path, str(e))])
            return value
        return number if isinstance(number, int) else value  # a callable (num_tokens_from_num_steps_callable)

    return walk(config, ""), problems


def check(config: dict[str, Any]) -> tuple[ConfigGraph, list[Problem]]:
    config, folded = fold_numbers(config)
    graph = ConfigGraph(inline_list_references(config))
    problems = graph.check() + folded
    entities = entities_of(config)
    for key in [*entities, "eval_dataloaders", "settings"]:
        if key not in config:
            problems.append(Problem(key, f"a Modalities training config needs a top-level '{key}'"))
    for key, component_key in entities.items():
        pending = graph.placeholder(config.get(key), key, []) if key in config else None
        if pending is not None and getattr(pending, "known", False) and pending.component_key != component_key:
            problems.append(Problem(key, f"must be a '{component_key}' component, not '{pending.component_key}'"))
    evals = config.get("eval_dataloaders")
    if evals is not None and not (isinstance(evals, list) and all(is_reference(e) or is_component(e) for e in evals)):
        problems.append(Problem("eval_dataloaders", "must be a list of data_loader references"))
    for key, value in config.items():
        if key in entities or key in ("settings", "eval_dataloaders") or is_component(value) or is_reference(value):
            continue
        problems.append(
            Problem(
                key,
                f"unknown top-level key '{key}'{did_you_mean(key, [*entities, 'settings'])}; "
                "a Modalities config holds settings, its entities and named components",
            )
        )
    try:
        settings = ModalitiesSettings.model_validate(config.get("settings") or {})
    except ValidationError as e:
        problems += pydantic_problems(e, "settings", ModalitiesSettings)
    else:
        problems += settings_problems(settings)
    if problems:
        return graph, problems
    say_not_honoured(wrapped_model_block(graph))  # from the checked, typed configs
    say_keys_without_effect(graph.config)
    checkpointing = bool(settings.training and settings.training.activation_checkpointing_modules)
    translated, block_names = translate(
        with_release(graph.config, release_of(settings)), graph, activation_checkpointing=checkpointing
    )
    return ModalitiesGraph(translated, block_names), problems


RELEASES = {
    "lora_branch": "Modalities config written for the lora branch (settings.training): with reuse_last_target false "
    "a sample is a block of sequence_length + 1 tokens",
    "0.5.0": "Modalities config written for modalities 0.5.0 (settings.step_profile): with reuse_last_target false a "
    "sample is a block of sequence_length tokens",
}


def release_of(settings: ModalitiesSettings) -> str:
    """Which Modalities a config is written for, where their meanings differ (data blocks, .pbin packing): its
    settings block tells. settings.training is the lora branch's (2024); settings.step_profile is modalities
    0.5.0's (and the lora_2 branch's, which has no reuse_last_target and agrees with 0.5.0 everywhere else)."""
    return "lora_branch" if settings.training is not None else "0.5.0"


def with_release(config: dict[str, Any], release: str) -> dict[str, Any]:
    """The config with every continuous packed dataset that does not name its `release` given this one, and every
    LoRA model Modalities' embedding adapter draw (A ~ N(0, 1), B = 0: both lora branches) unless it names one."""
    config = copy.deepcopy(config)
    for _, block in component_blocks(config):
        if block.get("variant_key") == "packed_mem_map_dataset_continuous" and isinstance(block.get("config"), dict):
            block["config"] = {"release": release, **block["config"]}
        if block.get("variant_key") == "lora" and isinstance(block.get("config"), dict):  # model/lora
            block["config"] = {"embedding_init": "modalities", **block["config"]}
    return config


# ------------------------------------------------------------------------------------------------ building
def build(graph: ModalitiesGraph) -> BuiltRun:
    """The run's entities and settings: the `BuiltRun` lorafit's runner takes from any layout."""

    config = graph.config
    settings = ModalitiesSettings.model_validate(config["settings"])
    world = int(os.environ.get("WORLD_SIZE", 1))
    with deferred_init():
        built = {key: graph.build(key) for key in entities_of(config)}
    if "app_state" in built:  # modalities 0.5.0: the model, optimizer and scheduler come in one app_state/raw
        app = built.pop("app_state")
        built.update({key: getattr(app, name) for key, name in APP_STATE.items()})
    built["progress"] = built.pop(PROGRESS[1], None) or built.pop(PROGRESS[0])
    if graph.block_names is not None:  # the translated fsdp block's (modalities/training.py)
        path, names = graph.block_names
        check_block_names(built["wrapped_model"], names, f"{path}.config.block_names")
    if "device_mesh" in built:
        built["device_mesh"].check(world)
    evals: list[ModalitiesLoader] = [
        graph.build_value(v, f"eval_dataloaders[{i}]") for i, v in enumerate(config["eval_dataloaders"])
    ]
    train: ModalitiesLoader = built["train_dataloader"]
    plan = plan_of(settings, train, world)
    plan["release"] = release_of(settings)
    info(RELEASES[plan["release"]])
    _check_consistency(graph, settings, built, plan)
    keep = built["checkpoint_saving"].strategy.keep
    results = built["evaluation_subscriber"]
    run_settings = RunSettings(
        seed=train.seed,
        step_profile=StepProfile(
            local_train_micro_batch_size=plan["micro"],
            gradient_accumulation_steps=plan["accumulation"],
            sequence_length=plan["sequence"],
        ),
        training_target=TrainingTarget(num_target_steps=plan["steps"]),
        intervals=Intervals(**plan["intervals"]),
        checkpointing=Checkpointing(keep_last=keep if keep is not None else 10**9),
        gradient_clipping=built["gradient_clipper"].max_norm,
        loggers=_loggers(results, settings),
    )
    tokenizer = _tokenizer_of(train)
    plan["checkpoint_root"] = built["checkpoint_saving"].execution.checkpoint_path
    return BuiltRun(
        settings=run_settings,
        model=built["wrapped_model"],
        train_dataset=train.view(world, whole=True),
        tokenizer=unwrap_tokenizer(tokenizer) if tokenizer is not None else None,
        eval_datasets={loader.tag: loader.view(world) for loader in evals},
        # Modalities' evaluator: each loader's own batch size, the mean of per-batch means, first at step 0
        eval_batch_sizes={loader.tag: loader.micro_batch_size for loader in evals},
        eval_loss="batch_mean",
        eval_at_start=True,
        optimizer=built["optimizer"],
        scheduler=built["scheduler"],
        parallelism=graph.build("parallelism"),  # what the fsdp block asked, translated when checked
        shuffle=train.shuffle,
        samples_per_epoch=train.epoch_samples(world),
        progress=built["progress"].bar,
        loss_normalization="micro_batch_mean",  # Modalities' CLMCrossEntropyLoss: the token mean per micro-batch
        step_plan=describe(plan),
    )


def plan_of(settings: ModalitiesSettings, train: Any, world: int) -> dict[str, Any]:
    """Micro batch, accumulation, sequence length, steps, intervals and global batch, by Modalities' rules."""
    if settings.training is not None:
        t = settings.training
        micro, accumulation, sequence = t.local_train_micro_batch_size, t.gradient_acc_steps, t.sequence_length
        # the lora branch trains one pass over the train data loader; a step every gradient_acc_steps micro-batches
        steps = train.local_num_batches(world) // accumulation
        intervals = {
            k: getattr(t, k)
            for k in (
                "training_log_interval_in_steps",
                "checkpointing_interval_in_steps",
                "evaluation_interval_in_steps",
            )
        }
    else:
        sp = settings.step_profile
        micro, accumulation, sequence = (
            sp.local_train_micro_batch_size,
            sp.gradient_accumulation_steps,
            sp.sequence_length,
        )
        steps = settings.training_target.num_target_steps - (settings.training_progress or NewProgress()).num_seen_steps
        intervals = dict(settings.intervals)
    global_batch = micro * accumulation * world
    return {
        "micro": micro,
        "accumulation": accumulation,
        "sequence": sequence,
        "steps": steps,
        "world": world,
        "global_batch": global_batch,
        "tokens_per_step": global_batch * sequence,
        "intervals": intervals,
    }


def _check_consistency(graph: ConfigGraph, settings: ModalitiesSettings, built: dict, plan: dict) -> None:
    problems = []
    train = built["train_dataloader"]
    if train.micro_batch_size != plan["micro"]:
        problems.append(
            Problem(
                "train_dataloader.config.batch_sampler.config.batch_size",
                f"{train.micro_batch_size} differs from the settings' local_train_micro_batch_size {plan['micro']}",
            )
        )
    seq = getattr(train.dataset, "sequence_length", plan["sequence"])
    if seq != plan["sequence"]:
        problems.append(
            Problem(
                "train_dataloader.config.dataset",
                f"sequence_length {seq} differs from the settings' {plan['sequence']}",
            )
        )
    if plan["steps"] < 1:
        problems.append(
            Problem(
                "settings",
                f"the train data loader gives {train.local_num_batches(plan['world'])} "
                f"micro-batches per rank, fewer than one step of {plan['accumulation']}",
            )
        )
    max_steps = built["scheduler"].max_steps() if hasattr(built["scheduler"], "max_steps") else None
    if max_steps is not None and plan["steps"] > max_steps:
        problems.append(
            Problem(
                "scheduler.config.total_steps",
                f"{max_steps} steps, but the run takes "
                f"{plan['steps']}: torch's OneCycleLR raises after step {max_steps} (as in Modalities)",
            )
        )
    wrapped, optimizer_model = built["wrapped_model"], built["optimizer"].config.wrapped_model
    if optimizer_model is not wrapped:
        problems.append(Problem("optimizer.config.wrapped_model", "must reference the run's wrapped_model"))
    loss, collate = built["loss_fn"], train.collate_fn
    target_key = getattr(getattr(collate, "wrapped", collate), "target_key", None)
    if target_key is not None and loss.target_key != target_key:
        problems.append(
            Problem("loss_fn.config.target_key", f"'{loss.target_key}' is not the collator's target '{target_key}'")
        )
    modules = settings.training.activation_checkpointing_modules if settings.training is not None else []
    blocks = {type(b).__name__ for b in decoder_blocks(wrapped)}
    if modules and not set(modules) <= blocks:
        problems.append(
            Problem(
                "settings.training.activation_checkpointing_modules",
                f"lorafit checkpoints the model's decoder blocks ({', '.join(sorted(blocks)) or 'none'}); "
                f"{sorted(set(modules) - blocks)} are not among them",
            )
        )
    if settings.training is not None and settings.training.global_num_seen_tokens:
        problems.append(
            Problem(
                "settings.training.global_num_seen_tokens",
                "Modalities' manual resume; lorafit resumes with --resume_from: leave it 0",
            )
        )
    if problems:
        raise ConfigError("", problems=problems)


def checkpoint_root(config: dict[str, Any]) -> Path | None:
    """checkpoint_saving's checkpoint_path in a resolved Modalities config (references followed), or None."""
    node: Any = config.get("checkpoint_saving")
    for key in ("config", "checkpoint_saving_execution", "config", "checkpoint_path"):
        while is_reference(node):
            node = config.get(node.get("instance_key"))
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return Path(node) if isinstance(node, str) else None


def _loggers(results: Any, settings: ModalitiesSettings) -> Any:
    wandb = getattr(results, "wandb", None)
    if wandb is None:
        return LoggersConfig()
    return LoggersConfig(
        wandb=WandbConfig(
            mode=wandb.mode.lower(), project=wandb.project, directory=wandb.directory, name=wandb.experiment_id
        )
    )


def _tokenizer_of(loader: Any) -> Any:
    return getattr(loader.collate_fn, "tokenizer", None)


def describe(p: dict[str, Any]) -> list[str]:
    """`lorafit validate`'s lines for a Modalities config: the numbers Modalities would use (`plan_of`'s plan)."""
    iv = p["intervals"]
    return [
        f"Modalities config: {p['steps']} steps on {p['world']} process(es); global batch {p['global_batch']} samples "
        f"= micro batch {p['micro']} x gradient accumulation {p['accumulation']} x world size {p['world']}, "
        f"{p['tokens_per_step']:,} tokens per step (x sequence length {p['sequence']})",
        f"intervals: log every {iv['training_log_interval_in_steps']}, evaluate every "
        f"{iv['evaluation_interval_in_steps']}, checkpoint every {iv['checkpointing_interval_in_steps']} steps; "
        f"checkpoints under {p['checkpoint_root']}/<experiment_id>/; loss: token mean per micro-batch, "
        "averaged over micro-batches and ranks",
        RELEASES[p["release"]] + " (train_dataset.config.release decides it otherwise)",
    ]
