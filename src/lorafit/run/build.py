"""From a config file to built run entities: checking, building, and `lorafit validate`'s report.

The order is fixed: resolve `${...}` -> check the whole graph and the run spec (every problem at once) -> build.
Nothing is built from a config that has a known problem.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lorafit.components import load_builtin_components
from lorafit.config.context import build_context, current_context
from lorafit.config.graph import ConfigGraph, component_blocks, is_component, is_reference, pydantic_problems
from lorafit.config.layouts import (
    BuiltRun,
    RunOutline,
    adapters_from_checkpoint,
    checked_graph,
    has_weights_file,
    layout_of,
    needs_whole_weights,
)
from lorafit.config.loader import ConfigEnv, load_config
from lorafit.config.registry import REGISTRY, Pending
from lorafit.config.run_spec import DEFAULT_COMPONENTS, RUN_ENTITIES, RunSettings, RunSpec, describe_steps, settings_of
from lorafit.console import info
from lorafit.data.token_files import is_pack_index
from lorafit.errors import ConfigError, Problem, UserError, did_you_mean
from lorafit.lora import count_parameters, describe_lora, has_lora, reset_lora_parameters
from lorafit.lora.model import init_from_base
from lorafit.models.deferred import deferred_init
from lorafit.models.shard_loading import is_meta, load_shards, weight_file
from lorafit.models.weights import reinit_nonpersistent_buffers
from lorafit.training.memory import describe as describe_resources
from lorafit.training.trackers import LoggersConfig, missing_packages


def check_run_config(config: dict[str, Any]) -> ConfigGraph:
    """The graph of a run config, or a ConfigError listing every problem found."""
    load_builtin_components()
    graph, problems = layout_of(config, NATIVE).check(config)
    if problems:
        raise ConfigError("", problems=sorted(set(problems), key=lambda p: p.path))
    return graph


def _check_native(config: dict[str, Any]) -> tuple[ConfigGraph, list[Problem]]:
    graph = ConfigGraph(config)
    problems = graph.check()
    for key, value in config.items():
        if key == "settings" or key in RUN_ENTITIES or is_component(value) or is_reference(value):
            continue
        problems.append(
            Problem(
                key,
                f"unknown top-level key '{key}'{did_you_mean(key, [*RUN_ENTITIES, 'settings'])}"
                f"; the top level holds settings, the run entities ({', '.join(RUN_ENTITIES)}) "
                "and named components {component_key, variant_key, config}",
            )
        )
    values: dict[str, Any] = {"settings": settings_of(config)}
    for key in RUN_ENTITIES:
        if key in config:
            values[key] = graph.placeholder(config[key], key, [])
    try:
        RunSpec.model_validate(values)
    except ValidationError as e:
        problems += [
            p
            if p.message != "missing required key"
            else Problem(p.path, f"a run needs a top-level '{p.path}' entity (a component or a reference to one)")
            for p in pydantic_problems(e, "", RunSpec)
        ]
    problems += _missing_tracker_packages(config) + _sequence_length_problems(config)
    return graph, problems


def _datasets(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(YAML path, block) of every dataset component where it is written (references not followed)."""
    return ((path, block) for path, block in component_blocks(config) if block.get("component_key") == "dataset")


def _sequence_length_problems(config: dict[str, Any]) -> list[Problem]:
    """A dataset's own sequence_length must be the run's: one number for the blocks, the step budget and the
    position check (a dataset that leaves it null is given the settings' when built)."""
    try:
        seq = RunSettings.model_validate(settings_of(config)).step_profile.sequence_length
    except ValidationError:
        return []  # RunSpec reported it
    return [
        Problem(
            f"{path}.config.sequence_length",
            f"{own} differs from settings.step_profile.sequence_length "
            f"{seq}: a run has one sequence length; leave it null here (or set the run's in settings)",
        )
        for path, block in _datasets(config)
        if isinstance(block.get("config"), dict)
        and (own := block["config"].get("sequence_length")) is not None
        and own != seq
    ]


def with_sequence_length(config: dict[str, Any], seq: int) -> dict[str, Any]:
    """`config` with `seq` written into every dataset block that takes a sequence_length and leaves it null."""
    config = copy.deepcopy(config)
    for _, block in _datasets(config):
        vk = block.get("variant_key")
        fields = REGISTRY.get("dataset", vk).config_model.model_fields if REGISTRY.has("dataset", vk) else {}
        if "sequence_length" in fields and (block.get("config") or {}).get("sequence_length") is None:
            block["config"] = {**(block.get("config") or {}), "sequence_length": seq}
    return config


def _missing_tracker_packages(config: dict[str, Any]) -> list[Problem]:
    try:
        loggers = LoggersConfig.model_validate(settings_of(config).get("loggers") or {})
    except ValidationError:
        return []  # RunSpec reported it
    return missing_packages(loggers)


def build_run(graph: ConfigGraph, *, world_size: int = 1) -> BuiltRun:
    """The run's entities, built once by the config's layout. With fsdp2 on `world_size` > 1 processes the model
    is built on the meta device and gets its weights after sharding (`meta_build_blocker` says when it cannot)."""
    layout, outline = layout_of(graph.config, NATIVE), run_outline(graph.config)
    blocker = _meta_build_blocker(outline, world_size) if current_context().load_weights else "validate"
    # adapters are drawn once, when model/lora creates them, from the run's seed (a meta build: after sharding)
    if blocker is None:
        with build_context(meta_device=True, adapter_seed=outline.seed):
            run = layout.build(graph)
        _check_sequence_length(run)
        return _after_meta_build(run, outline)
    if world_size > 1 and blocker != "not fsdp2":
        info(f"parallelism fsdp2: every rank builds the whole model and loads its weights before sharding: {blocker}")
    with build_context(adapter_seed=outline.seed):
        run = layout.build(graph)
    _check_sequence_length(run)
    _adapters_from_base(run, outline)
    return run


def run_outline(config: dict[str, Any]) -> RunOutline:
    """The run-level decisions of a checked config (config/layouts.py), taken by its layout."""
    load_builtin_components()
    return layout_of(config, NATIVE).outline(config)


class _LorafitLayout:
    """lorafit's own layout: `settings` (config/run_spec.py) and the run entities."""

    name = "lorafit"

    def recognises(self, config: dict[str, Any]) -> bool:
        return True

    def check(self, config: dict[str, Any]) -> tuple[ConfigGraph, list[Problem]]:
        return _check_native(config)

    def outline(self, config: dict[str, Any]) -> RunOutline:
        seed = RunSettings.model_validate(settings_of(config)).seed
        return dataclasses.replace(lorafit_outline(config), seed=seed)

    def build(self, graph: ConfigGraph) -> BuiltRun:
        return _build_native(graph)


NATIVE = _LorafitLayout()


def _build_native(graph: ConfigGraph) -> BuiltRun:
    config = graph.config
    settings = RunSettings.model_validate(settings_of(config))

    built: dict[str, Any] = {}
    # one sequence length: datasets that leave theirs null are given the settings' in their config (a differing
    # one was refused by the check), so the blocks, the step budget and the position check use the same number
    graph = ConfigGraph(with_sequence_length(config, settings.step_profile.sequence_length))
    with deferred_init():  # random init only for models that no checkpoint fills
        for key in RUN_ENTITIES:
            if key in config:
                built[key] = graph.build(key)
    for key, (component_key, variant_key) in DEFAULT_COMPONENTS.items():
        if key not in built:
            spec = REGISTRY.get(component_key, variant_key)
            built[key] = spec.builder(spec.config_model.model_validate({}))
    run = BuiltRun(settings=settings, **built)
    _check_vocabulary(run)
    return run


def lorafit_outline(config: dict[str, Any] | ConfigGraph) -> RunOutline:
    """The decisions of a lorafit config, from its checked components' typed configs (config/layouts.py)."""
    graph = checked_graph(config)
    parallelism = graph.entity(graph.checked.get("parallelism"))
    if not isinstance(parallelism, Pending):
        parallelism = None
    return RunOutline(
        parallelism=parallelism.variant_key if parallelism is not None else None,
        # fsdp2's (the default under torchrun); the other strategies have no such setting
        load_after_sharding=getattr(parallelism.config if parallelism else None, "load_after_sharding", True),
        weights_file=has_weights_file(graph),
        needs_whole_weights=needs_whole_weights(graph),
        adapters_from_checkpoint=adapters_from_checkpoint(graph),
        has_evaluators=bool(graph.checked.get("evaluators")),
    )


def _adapters_from_base(run: BuiltRun, outline: RunOutline) -> None:
    """The adapters were drawn when created, from the outline's seed (the run's: the same initial adapter in any
    process, on 1 rank or N); what they take from the base is set now that the base holds its final values (a
    checkpoint loaded after the injection, frozen weights stored in bf16): pissa/olora decompose it (once), DoRA
    measures m. Nothing is drawn. Not when the weights file held the adapters too."""
    if outline.adapters_from_checkpoint or not has_lora(run.model):
        return
    if outline.seed != run.settings.seed:  # the layout's outline and its build must agree on the one seed
        raise RuntimeError(f"the adapters were drawn from seed {outline.seed}, the run's is {run.settings.seed}")
    init_from_base(run.model)


# ------------------------------------------------------------------------------- fsdp2: meta build, load after
# Under fsdp2 on N processes every rank would otherwise build and load the whole model before sharding it. Built on
# the meta device instead (no memory), with LoRA injected there too, the model is sharded first; then each rank reads
# only its shards of the weights file (lorafit/models/shard_loading.py), and the adapters are initialised once, from
# the run's seed and the loaded base (pissa/olora decompose it, DoRA measures it), exactly as on one process.
def meta_build_blocker(config: dict[str, Any], world_size: int) -> str | None:
    """None when the run's model is built on the meta device and loaded after sharding; else why not."""
    return _meta_build_blocker(run_outline(config), world_size)


def _meta_build_blocker(outline: RunOutline, world_size: int) -> str | None:
    if world_size < 2 or outline.parallelism not in (None, "fsdp2"):  # absent: fsdp2 (torchrun)
        return "not fsdp2"
    if not outline.load_after_sharding:
        return "parallelism.config.load_after_sharding is false"
    if not outline.weights_file:
        return "the model has no weights file (random initialisation runs on the whole model)"
    if outline.needs_whole_weights:
        return outline.needs_whole_weights
    if outline.has_evaluators:
        return "the evaluators run on rank 0's whole model before training"
    return None


def _after_meta_build(run: BuiltRun, outline: RunOutline) -> BuiltRun:
    if not is_meta(run.model):  # a builder loaded the model itself (and said why)
        _adapters_from_base(run, outline)
        return run
    recorded = weight_file(run.model)
    if recorded is None:  # a meta model no file fills: what builds it is not a weights-file model
        raise UserError(
            f"the model ({type(run.model).__name__}) was built on the meta device for fsdp2, but no "
            "weights file was recorded for it; set parallelism.config.load_after_sharding: false, use "
            "parallelism ddp, or a model/checkpointed or "
            "model/huggingface_pretrained_model",
            field="model",
        )
    info(
        f"parallelism fsdp2: the model is built on the meta device; after sharding, each rank reads only its "
        f"shards of {recorded.source}"
    )
    seed = None if outline.adapters_from_checkpoint else run.settings.seed
    run.fill_weights_after_sharding = functools.partial(fill_weights_after_sharding, seed=seed)
    return run


def fill_weights_after_sharding(model: Any, *, seed: int | None) -> None:
    """Base weights (this rank's shards), rotary tables, then the adapters from `seed`: the order of one process.
    `seed` None: the file held the adapters too (`adapters_from_checkpoint`), they stay as loaded."""

    load_shards(model)
    reinit_nonpersistent_buffers(model, force=True)  # `to_empty` left them uninitialised
    if has_lora(model) and seed is not None:
        reset_lora_parameters(model, seed=seed)


def _check_sequence_length(run: BuiltRun) -> None:
    seq = run.settings.step_profile.sequence_length
    limit = getattr(getattr(run.model, "config", None), "max_position_embeddings", None)
    if limit and seq > limit:
        raise ConfigError(
            f"{seq} is above the model's maximum sequence length {limit} (max_position_embeddings)",
            field="settings.step_profile.sequence_length",
        )


def _check_vocabulary(run: BuiltRun) -> None:
    """Token ids must index the model's embedding: a larger tokenizer (or data packed with one) would end in an
    IndexError deep in the first forward. Checked at validate too (the tokenizer is built there)."""
    rows = getattr(getattr(run.model, "config", None), "vocab_size", None)
    if not rows:
        return
    if run.tokenizer is not None and len(run.tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer has {len(run.tokenizer):,} tokens but the model's embedding has {rows:,} "
            f"rows (config.json vocab_size): ids from {rows:,} on have no embedding; use the model's "
            "own tokenizer",
            field="tokenizer",
        )
    for name, dataset in [("train_dataset", run.train_dataset), *run.eval_datasets.items()]:
        vocab = (_pack_meta(dataset) or {}).get("tokenizer", {}).get("vocab_size")
        if isinstance(vocab, int) and vocab > rows:
            raise ConfigError(
                f"{dataset.prefix}.json was packed with a tokenizer of {vocab:,} tokens, more than "
                f"the model's {rows:,} embedding rows; pack it with the model's tokenizer",
                field=name,
            )


def _pack_meta(dataset: Any) -> dict[str, Any] | None:
    """The pack index of a dataset over a packed token file: from the opened data, else its `.json` as it is on
    disk (validate opens no data; a cache not yet tokenized has none)."""
    packed = getattr(dataset, "_data", None)
    if packed is not None:
        return getattr(packed, "meta", None)
    if getattr(dataset, "cache_is_stale", False):  # lorafit's own cache, tokenized again by `run` (text_files)
        return None
    prefix = getattr(dataset, "prefix", None)
    index = Path(f"{prefix}.json") if prefix is not None else None
    if index is None or not index.is_file() or not is_pack_index(index):
        return None
    try:
        return json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the run opens it and says what is wrong


def load_run_config(
    config_path: Path, env: ConfigEnv | None = None, overrides: tuple[str, ...] = ()
) -> tuple[dict[str, Any], ConfigGraph]:
    config = load_config(Path(config_path), env, overrides)  # its layout is recognised when checked
    return config, check_run_config(config)


def build_run_entities(config_path: Path, names: list[str]) -> dict[str, Any]:
    """Only the named run entities of a config (e.g. the model and tokenizer for `lorafit merge`)."""
    config, graph = load_run_config(config_path)

    with deferred_init():
        return {name: graph.build(name) for name in names if name in config}


def validate_config(
    config_path: Path, overrides: tuple[str, ...] = (), *, verbose: bool = False, processes: int = 1
) -> str:
    """Check everything, build the model on the meta device, and say what a run would do (`verbose`: every
    adapted module, not only where each target landed; `processes`: the run's process count, for its memory)."""
    _config, graph = load_run_config(config_path, overrides=overrides)
    with build_context(meta_device=True, load_weights=False, announce=False):
        run = build_run(graph)
    lines = [f"config OK: {config_path}"]
    lines.append(f"model: {type(run.model).__name__}")
    lines.append(_describe_model(run.model, verbose))
    epochs = run.settings.training_target.num_target_epochs is not None  # only then do the samples matter
    lines.append(describe_steps(run.settings, _samples_if_tokenized(run.train_dataset) if epochs else None))
    if run.step_plan:  # the layout plans steps and batches its own way
        lines[-1:] = run.step_plan
    lines += describe_resources(run, _config, processes)  # precision, compile and predicted peak memory
    return "\n".join(lines)


def _samples_if_tokenized(dataset: Any) -> int | None:
    """len(dataset) when its tokenized data is already there (validate tokenizes nothing), else None."""
    try:
        return len(dataset)
    except (UserError, RuntimeError, OSError):
        return None


def _describe_model(model: Any, verbose: bool) -> str:
    if has_lora(model):
        text = describe_lora(model, verbose=verbose)
        return text if verbose else f"{text}\n(--verbose lists every adapted module)"
    trainable, total = count_parameters(model)
    return f"no LoRA layers; trainable params: {trainable:,} / {total:,} (full fine-tuning)"


__all__ = [
    "BuiltRun",
    "UserError",
    "build_run",
    "build_run_entities",
    "check_run_config",
    "load_run_config",
    "validate_config",
]
