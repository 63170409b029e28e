"""Config layouts: how a config file of one layout becomes the core's run description. THE hook for other layouts.

`lorafit run` and `lorafit validate` read a config as: load the YAML and resolve `${...}` (config/loader.py) ->
`layout_of(config)` (here) -> its `check` (the whole graph and its settings, every problem at once) -> its
`outline` (the run-level decisions taken before building: parallelism, where the run folder goes, whether the
model is built on the meta device) -> its `build` -> `BuiltRun` (lorafit/run/build.py): one typed `RunSettings` plus
the built entities -> `TrainJob(settings=...)` -> the loop.

lorafit's own layout (the `settings` block of `config/run_spec.py` and the run entities `model`, `train_dataset`,
...) is the default (run/build.py). Another layout (Modalities', lorafit/modalities/run.py) is translated at this
border into the same run description: what it means differently arrives as typed settings of the core (the loss
normalisation, the run folder root, the step plan it prints), never as a question the core asks about the config.
The component table (lorafit/components.py) imports the modules that register layouts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from lorafit.config.graph import ConfigGraph, component_blocks
from lorafit.config.registry import Pending
from lorafit.config.run_spec import RunSettings

if TYPE_CHECKING:  # annotations only: torch and transformers cost seconds to import
    from torch import nn
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler
    from torch.utils.data import Dataset
    from transformers import PreTrainedTokenizerBase

    from lorafit.distributed.parallel import Strategy
    from lorafit.errors import Problem

# What a step's loss is the mean of (training/loop.py). "global_tokens" (lorafit's): every target token of the
# global batch, one weight each, so 1 and N processes agree. "micro_batch_mean": each micro-batch's token mean,
# averaged over micro-batches and ranks (Modalities' CLMCrossEntropyLoss; the Modalities layout sets it)
EvalLoss = Literal["token_mean", "batch_mean"]
LossNormalization = Literal["global_tokens", "micro_batch_mean"]


@dataclass(frozen=True)
class RunOutline:
    """What a run decides from its checked config before anything is built (typed; read once, here)."""

    parallelism: Literal["none", "ddp", "fsdp2"] | None  # None: the default (fsdp2 under torchrun, else none)
    load_after_sharding: bool = True  # fsdp2: build on the meta device, read each rank's shards after sharding
    weights_file: bool = False  # the model's weights come from a file (the meta build can read them after sharding)
    # why the loaded weights must be whole before sharding (a conversion or re-draw of them), or None
    needs_whole_weights: str | None = None
    adapters_from_checkpoint: bool = False  # the weights file holds the adapters too: none are drawn
    has_evaluators: bool = False
    seed: int | None = None  # what the adapters are drawn from when created (the run's seed; None: the global RNG)
    run_root: Path | None = None  # run folders go under it unless --experiments_root_path names another root


class Evaluator(Protocol):
    """What runner.run_evaluators calls before and after training (e.g. evaluator/exact_match)."""

    name: str

    def run(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]: ...


@dataclass
class BuiltRun:
    """The run description every config layout builds (config/layouts.py): typed settings and built entities."""

    settings: RunSettings
    model: nn.Module
    train_dataset: Dataset  # map-style: items {"input_ids", "labels", ...}
    tokenizer: PreTrainedTokenizerBase | None = None
    eval_datasets: dict[str, Dataset] = field(default_factory=dict)
    optimizer: Callable[[nn.Module], Optimizer] | None = None  # over the trainable parameters of what was wrapped
    scheduler: Callable[[Optimizer, int], LRScheduler] | None = None  # (optimizer, total steps)
    parallelism: Strategy | None = None  # None: fsdp2 under torchrun, else none
    evaluators: list[Evaluator] = field(default_factory=list)
    # the model was built on the meta device (fsdp2 on several processes): called with it after sharding, it reads
    # each rank's shards of the base weights and initialises the adapters (TrainJob.fill_weights_after_sharding)
    fill_weights_after_sharding: Callable[[nn.Module], None] | None = None
    shuffle: bool = True  # the sampler permutes the train samples each epoch
    # train samples per epoch when the layout fixes it (Modalities: whole micro-batches on every rank, drawn from a
    # permutation of ALL samples as torch's DistributedSampler + BatchSampler(drop_last) do); None: whole global batches
    samples_per_epoch: int | None = None
    progress: bool | None = None  # rich progress bar; None: when stdout is a terminal
    loss_normalization: LossNormalization = "global_tokens"
    # held-out evaluation: each eval dataset's batch size (default: the training micro batch), the loss as the
    # token mean of the whole set or as the mean of each batch's token mean (Modalities' evaluator), and whether
    # the untrained model is evaluated first (step 0; Modalities does)
    eval_batch_sizes: dict[str, int] = field(default_factory=dict)
    eval_loss: EvalLoss = "token_mean"
    eval_at_start: bool = False
    # `lorafit validate`'s lines on steps and batches when the layout plans them its own way (else from settings)
    step_plan: list[str] = field(default_factory=list)


class Layout(Protocol):
    name: str

    def recognises(self, config: dict[str, Any]) -> bool: ...

    def check(self, config: dict[str, Any]) -> tuple[ConfigGraph, list[Problem]]: ...

    def outline(self, config: dict[str, Any]) -> RunOutline: ...

    def build(self, graph: ConfigGraph, world_size: int) -> BuiltRun: ...


LAYOUTS: list[Layout] = []


def register_layout(layout: Layout) -> Layout:
    LAYOUTS.append(layout)
    return layout


def layout_of(config: dict[str, Any], default: Layout) -> Layout:
    """The registered layout that recognises `config` (the first), else `default` (lorafit's own)."""
    return next((layout for layout in LAYOUTS if layout.recognises(config)), default)


# ------------------------------------------------------------------------------------------------ for outlines
# What every layout's outline asks of a checked config: its components as validated (`ConfigGraph.check` keeps each
# block's typed config, references resolved to the entity they name), never the YAML dict read again.
WEIGHT_FILE_MODELS = ("huggingface_pretrained_model", "checkpointed")


def components_of(value: Any) -> Iterator[dict[str, Any]]:
    """Every component block in a config value, however deep (references not followed)."""
    return (block for _, block in component_blocks(value))


def checked_graph(config: dict[str, Any] | ConfigGraph) -> ConfigGraph:
    """The graph of `config` with its components' typed configs: as given when already checked, else checked now
    (a component that does not validate has no typed config and decides nothing)."""
    if isinstance(config, ConfigGraph) and config.checked:
        return config
    graph = ConfigGraph(config.config if isinstance(config, ConfigGraph) else config)
    graph.check()
    return graph


def has_weights_file(graph: ConfigGraph) -> bool:
    """Whether a model component reads its weights from a file (which the meta build can read after sharding)."""
    return any(p.component_key == "model" and p.variant_key in WEIGHT_FILE_MODELS for p in graph.components.values())


def needs_whole_weights(graph: ConfigGraph) -> str | None:
    """Why some component needs the loaded weights whole before sharding (it converts or re-draws them), or None:
    a LoRA `frozen_dtype`, or a component whose config says so (`ComponentConfig.needs_whole_weights`)."""
    for p in graph.components.values():
        lora = (p.component_key, p.variant_key) == ("model", "lora")
        frozen = getattr(p.config, "frozen_dtype", None) if lora else None
        if frozen:
            return f"model/lora frozen_dtype {frozen} converts the loaded weights, which needs them before sharding"
        reason = getattr(type(p.config), "needs_whole_weights", None)
        if reason:
            return f"{p.component_key}/{p.variant_key} {reason}"
    return None


def adapters_from_checkpoint(graph: ConfigGraph) -> bool:
    """Whether a `model/checkpointed` wraps the `model/lora`: its file then holds every A and B (loading is strict),
    and the run starts from them (Modalities' way to continue from a LoRA checkpoint) instead of drawing new ones."""

    def has_lora(node: Any) -> bool:
        node = graph.entity(node)
        if not isinstance(node, Pending) or node.component_key != "model":
            return False
        return node.variant_key == "lora" or has_lora(getattr(node.config, "model", None))

    return any(
        p.variant_key == "checkpointed" and has_lora(getattr(p.config, "model", None))
        for p in graph.components.values()
    )
