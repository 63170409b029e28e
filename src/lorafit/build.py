"""From a config file to built run entities: checking, building, and `lorafit validate`'s report.

The order is fixed: resolve `${...}` -> check the whole graph and the run spec (every problem at once) -> build.
Nothing is built from a config that has a known problem.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lorafit.components import load_builtin_components
from lorafit.config.context import build_context, current_context
from lorafit.config.graph import ConfigGraph, is_component, is_reference, pydantic_problems
from lorafit.config.layouts import normalize_layout
from lorafit.config.loader import ConfigEnv, load_config
from lorafit.config.registry import REGISTRY
from lorafit.config.run_spec import DEFAULT_COMPONENTS, RUN_ENTITIES, RunSettings, RunSpec, num_steps, settings_of
from lorafit.console import info
from lorafit.errors import ConfigError, Problem, UserError, did_you_mean


@dataclass
class BuiltRun:
    settings: RunSettings
    model: Any
    train_dataset: Any
    tokenizer: Any = None
    eval_datasets: dict[str, Any] = field(default_factory=dict)
    optimizer: Any = None
    scheduler: Any = None
    parallelism: Any = None
    evaluators: list[Any] = field(default_factory=list)
    # the model was built on the meta device (fsdp2 on several processes): called with it after sharding, it reads
    # each rank's shards of the base weights and initialises the adapters (TrainJob.fill_weights_after_sharding)
    fill_weights_after_sharding: Callable[[Any], None] | None = None
    job_options: dict[str, Any] = field(default_factory=dict)  # TrainJob fields a config layout sets (Modalities)
    modalities: dict[str, Any] | None = None  # a Modalities config: its plan (steps, batch) and checkpoint root


def check_run_config(config: dict[str, Any]) -> ConfigGraph:
    """The graph of a run config, or a ConfigError listing every problem found."""
    load_builtin_components()
    from lorafit.modalities import run as modalities_run

    if modalities_run.is_modalities_config(config):  # Modalities' entities and settings layouts
        graph, problems = modalities_run.check(config)
        if problems:
            raise ConfigError("", problems=sorted(set(problems), key=lambda p: p.path))
        return graph
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
    problems += _missing_tracker_packages(config)
    if problems:
        raise ConfigError("", problems=sorted(set(problems), key=lambda p: p.path))
    return graph


def _missing_tracker_packages(config: dict[str, Any]) -> list[Problem]:
    from lorafit.training.trackers import LoggersConfig, missing_packages

    try:
        loggers = LoggersConfig.model_validate(settings_of(config).get("loggers") or {})
    except ValidationError:
        return []  # RunSpec reported it
    return missing_packages(loggers)


def build_run(graph: ConfigGraph, *, world_size: int = 1) -> BuiltRun:
    """The run's entities, built once. With fsdp2 on `world_size` > 1 processes the model is built on the meta
    device and gets its weights after sharding (`meta_build_blocker` says when it cannot)."""
    blocker = meta_build_blocker(graph.config, world_size) if current_context().load_weights else "validate"
    if blocker is None:
        with build_context(meta_device=True):
            run = _build_run(graph)
        return _after_meta_build(run, seed_adapters=not adapters_from_checkpoint(graph.config))
    if world_size > 1 and blocker != "not fsdp2":
        info(f"parallelism fsdp2: every rank builds the whole model and loads its weights before sharding: {blocker}")
    run = _build_run(graph)
    if not adapters_from_checkpoint(graph.config):
        _seed_adapters(run)
    return run


def _build_run(graph: ConfigGraph) -> BuiltRun:
    config = graph.config
    from lorafit.modalities import run as modalities_run

    if modalities_run.is_modalities_config(config):
        run = modalities_run.build(graph, BuiltRun)
        _check_sequence_length(run)
        return run
    settings = RunSettings.model_validate(settings_of(config))
    from lorafit.models.deferred import deferred_init

    built: dict[str, Any] = {}
    # random init only for models that no checkpoint fills; datasets that leave sequence_length null take the
    # settings' (one source of truth: config/context.py)
    with deferred_init(), build_context(sequence_length=settings.step_profile.sequence_length):
        for key in RUN_ENTITIES:
            if key in config:
                built[key] = graph.build(key)
    for key, (component_key, variant_key) in DEFAULT_COMPONENTS.items():
        if key not in built:
            spec = REGISTRY.get(component_key, variant_key)
            built[key] = spec.builder(spec.config_model.model_validate({}))
    run = BuiltRun(settings=settings, **built)
    _check_sequence_length(run)
    _check_vocabulary(run)
    return run


def adapters_from_checkpoint(config: dict[str, Any]) -> bool:
    """Whether a `model/checkpointed` wraps the `model/lora`: its file then holds every A and B (loading is strict),
    and the run starts from them (Modalities' way to continue from a LoRA checkpoint) instead of drawing new ones."""

    def resolve(node: Any) -> Any:
        while is_reference(node):
            node = config.get(node["instance_key"])
        return node

    def has_lora(node: Any) -> bool:
        node = resolve(node)
        if not isinstance(node, dict):
            return False
        if node.get("component_key") == "model" and node.get("variant_key") == "lora":
            return True
        return has_lora((node.get("config") or {}).get("model")) if node.get("component_key") == "model" else False

    return any(
        c.get("variant_key") == "checkpointed" and has_lora((c.get("config") or {}).get("model"))
        for c in _components(config)
    )


def _seed_adapters(run: BuiltRun) -> None:
    """Adapters drawn from settings.seed, not from whatever state the global RNG had while building:
    the same config gives the same initial adapter in any process, on 1 rank or N. (pissa/olora layers that
    decomposed their loaded base when injected keep it: one decomposition, as after a meta build.)"""
    from lorafit.lora import has_lora, reset_lora_parameters

    if has_lora(run.model):
        reset_lora_parameters(run.model, seed=run.settings.seed, keep_decomposed=True)


# ------------------------------------------------------------------------------- fsdp2: meta build, load after
# Under fsdp2 on N processes every rank would otherwise build and load the whole model before sharding it. Built on
# the meta device instead (no memory), with LoRA injected there too, the model is sharded first; then each rank reads
# only its shards of the weights file (lorafit/models/shard_loading.py), and the adapters are initialised once, from
# the run's seed and the loaded base (pissa/olora decompose it, DoRA measures it), exactly as on one process.
_WEIGHT_FILE_MODELS = ("huggingface_pretrained_model", "checkpointed")


def meta_build_blocker(config: dict[str, Any], world_size: int) -> str | None:
    """None when the run's model is built on the meta device and loaded after sharding; else why not."""
    if world_size < 2 or not _shards_with_fsdp2(config):
        return "not fsdp2"
    if not _load_after_sharding(config):
        return "parallelism.config.load_after_sharding is false"
    components = list(_components(config))
    if not any(c.get("component_key") == "model" and c.get("variant_key") in _WEIGHT_FILE_MODELS
               for c in components):  # fmt: skip
        return "the model has no weights file (random initialisation runs on the whole model)"
    for c in components:
        frozen = (c.get("config") or {}).get("frozen_dtype") if c.get("variant_key") == "lora" else None
        if frozen:
            return f"model/lora frozen_dtype {frozen} converts the loaded weights, which needs them before sharding"
    if any(c.get("component_key") == "model" and c.get("variant_key") == "model_initialized" for c in components):
        return "model/model_initialized re-draws loaded weights, which needs them before sharding"
    if config.get("evaluators"):
        return "the evaluators run on rank 0's whole model before training"
    return None


def _shards_with_fsdp2(config: dict[str, Any]) -> bool:
    from lorafit.modalities import run as modalities_run

    if modalities_run.is_modalities_config(config):
        from lorafit.distributed.parallel import FSDP2Strategy
        from lorafit.modalities.training import parallelism_of

        return isinstance(parallelism_of(modalities_run.wrapped_model_block(config)), FSDP2Strategy)
    spec = _parallelism_spec(config)
    return spec is None or spec.get("variant_key", "fsdp2") == "fsdp2"  # absent: fsdp2 (torchrun)


def _parallelism_spec(config: dict[str, Any]) -> dict[str, Any] | None:
    spec = config.get("parallelism")
    if is_reference(spec):
        spec = config.get(spec["instance_key"])
    return spec if isinstance(spec, dict) else None


def _load_after_sharding(config: dict[str, Any]) -> bool:
    """The typed `parallelism/fsdp2` setting (the graph check validated it already; this reads the same value)."""
    from lorafit.distributed.parallel import FSDP2Config

    spec = _parallelism_spec(config)
    return FSDP2Config.model_validate((spec or {}).get("config") or {}).load_after_sharding


def _components(value: Any):
    if isinstance(value, dict):
        if is_component(value):
            yield value
        for item in value.values():
            yield from _components(item)
    elif isinstance(value, list):
        for item in value:
            yield from _components(item)


def _after_meta_build(run: BuiltRun, *, seed_adapters: bool = True) -> BuiltRun:
    from lorafit.models.shard_loading import is_meta, weight_file

    if not is_meta(run.model):  # a builder loaded the model itself (and said why)
        if seed_adapters:
            _seed_adapters(run)
        return run
    recorded = weight_file(run.model)
    if recorded is None:  # a meta model no file fills: what builds it is not a weights-file model
        raise UserError(f"the model ({type(run.model).__name__}) was built on the meta device for fsdp2, but no "
                        "weights file was recorded for it; set parallelism.config.load_after_sharding: false, use "
                        "parallelism ddp, or a model/checkpointed or "
                        "model/huggingface_pretrained_model", field="model")  # fmt: skip
    info(f"parallelism fsdp2: the model is built on the meta device; after sharding, each rank reads only its "
         f"shards of {recorded.source}")  # fmt: skip
    seed = run.settings.seed if seed_adapters else None
    run.fill_weights_after_sharding = functools.partial(fill_weights_after_sharding, seed=seed)
    return run


def fill_weights_after_sharding(model: Any, *, seed: int | None) -> None:
    """Base weights (this rank's shards), rotary tables, then the adapters from `seed`: the order of one process.
    `seed` None: the file held the adapters too (`adapters_from_checkpoint`), they stay as loaded."""
    from lorafit.lora import has_lora, reset_lora_parameters
    from lorafit.models.shard_loading import load_shards
    from lorafit.models.weights import reinit_nonpersistent_buffers

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
        raise ConfigError(f"the tokenizer has {len(run.tokenizer):,} tokens but the model's embedding has {rows:,} "
                          f"rows (config.json vocab_size): ids from {rows:,} on have no embedding; use the model's "
                          "own tokenizer", field="tokenizer")  # fmt: skip
    for name, dataset in [("train_dataset", run.train_dataset), *run.eval_datasets.items()]:
        packed = getattr(dataset, "_data", None)  # opened only when a run loads the data
        vocab = (getattr(packed, "meta", None) or {}).get("tokenizer", {}).get("vocab_size")
        if isinstance(vocab, int) and vocab > rows:
            raise ConfigError(f"{dataset.prefix}.json was packed with a tokenizer of {vocab:,} tokens, more than "
                              f"the model's {rows:,} embedding rows; pack it with the model's tokenizer",
                              field=name)  # fmt: skip


def load_run_config(
    config_path: Path, env: ConfigEnv | None = None, overrides: tuple[str, ...] = ()
) -> tuple[dict[str, Any], ConfigGraph]:
    config = normalize_layout(load_config(Path(config_path), env, overrides))  # other layouts: config/layouts.py
    return config, check_run_config(config)


def build_run_entities(config_path: Path, names: list[str]) -> dict[str, Any]:
    """Only the named run entities of a config (e.g. the model and tokenizer for `lorafit merge`)."""
    config, graph = load_run_config(config_path)
    from lorafit.models.deferred import deferred_init

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
    sp = run.settings.step_profile
    lines = [f"config OK: {config_path}"]
    lines.append(f"model: {type(run.model).__name__}")
    lines.append(_describe_model(run.model, verbose))
    tokens = sp.local_train_micro_batch_size * sp.gradient_accumulation_steps * sp.sequence_length
    lines.append(
        f"steps: {num_steps(run.settings, 1)} (one process); tokens per step per process: {tokens} "
        f"= micro batch {sp.local_train_micro_batch_size} x accumulation {sp.gradient_accumulation_steps} "
        f"x sequence {sp.sequence_length}"
    )
    if run.modalities is not None:
        from lorafit.modalities.run import describe

        lines[-1:] = describe(run)
    from lorafit.training.memory import describe as describe_resources

    lines += describe_resources(run, _config, processes)  # precision, compile and predicted peak memory
    return "\n".join(lines)


def _describe_model(model: Any, verbose: bool) -> str:
    from lorafit.lora import count_parameters, describe_lora, has_lora

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
