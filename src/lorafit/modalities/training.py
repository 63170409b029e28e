"""Modalities' training components: what each means, turned into the settings of lorafit's one training loop.

model/fsdp_wrapped            -> parallelism fsdp2 (FULL_SHARD, HYBRID_SHARD, SHARD_GRAD_OP) or ddp (NO_SHARD); the
                                 block is translated, when the config is read, into the model it wraps + `parallelism`
model/fsdp2_wrapped           -> parallelism fsdp2 (modalities 0.5.0 / main; translated alike, param_dtype -> precision)
optimizer/adam_w, adam        -> torch AdamW / Adam over the trainable parameters, Modalities' one group
scheduler/onecycle_lr, step_lr, constant_lr, cosine_annealing_lr, dummy_lr -> the torch scheduler, as configured
loss/clm_cross_entropy_loss   -> token cross-entropy, mean per micro-batch, averaged over micro-batches and ranks
gradient_clipper/fsdp, fsdp_logging_only, dummy -> clip to max_norm / only log the norm / nothing
gradient_clipper/fsdp2, fsdp2_logging_only       -> the same as fsdp, fsdp_logging_only (over the run's one mesh)
Checkpoint saving, number conversion and subscribers: modalities/checkpointing.py, numbers.py, subscribers.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, create_model, field_validator, model_validator
from torch import nn

from lorafit.config.registry import Component, ComponentConfig, Pending, register_component
from lorafit.errors import UserError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ model wrapping
class FSDPWrappedConfig(ComponentConfig):
    """Modalities' FSDP1 wrapping, as FSDP2 (fully_shard per block, then the root)."""

    model: Component("model")
    sync_module_states: bool
    mixed_precision_settings: str
    sharding_strategy: str
    block_names: list[str]

    @field_validator("mixed_precision_settings")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value not in ("FP_32", "BF_16", "BF_16_WORKING", "FP_16", "MIXED_PRECISION_MEGATRON", "NO_MIXED_PRECISION"):
            raise ValueError("valid: FP_32, BF_16, BF_16_WORKING, FP_16, MIXED_PRECISION_MEGATRON, NO_MIXED_PRECISION")
        if value in ("FP_16", "MIXED_PRECISION_MEGATRON"):
            raise ValueError(f"{value} (fp16 parameters) is not supported by lorafit; use FP_32 or BF_16")
        return value

    @field_validator("sharding_strategy")
    @classmethod
    def _sharding(cls, value: str) -> str:
        if value not in ("FULL_SHARD", "HYBRID_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "_HYBRID_SHARD_ZERO2"):
            raise ValueError("valid: FULL_SHARD, HYBRID_SHARD, SHARD_GRAD_OP, NO_SHARD, _HYBRID_SHARD_ZERO2")
        return value


class FSDP2PrecisionConfig(ComponentConfig):
    """Modalities' FSDP2MixedPrecisionSettings (PyTorchDtypes names)."""

    param_dtype: Literal["FP_32", "BF_16", "FP_16"]
    reduce_dtype: Literal["FP_32", "BF_16", "FP_16"]

    @field_validator("param_dtype")
    @classmethod
    def _param(cls, value: str) -> str:
        if value == "FP_16":
            raise ValueError("FP_16 (fp16 parameters) is not supported by lorafit; use FP_32 or BF_16")
        return value


class FSDP2WrappedConfig(ComponentConfig):
    """Modalities' FSDP2 wrapping (modalities 0.5.0 and main): lorafit's FSDP2, as for fsdp_wrapped."""

    model: Component("model")
    block_names: list[str]
    mixed_precision_settings: FSDP2PrecisionConfig
    # no effect on results, said in docs/modalities.md: lorafit reshards every block after forward, one block a unit
    reshard_after_forward: bool = True
    device_mesh: Component("device_mesh")
    layers_per_fsdp_unit: int = Field(1, ge=1)


FSDP_VARIANTS = ("fsdp_wrapped", "fsdp2_wrapped")
_TRANSLATED = (
    "{variant} is Modalities' sharding of a model, translated into lorafit's `parallelism` entity when "
    "a Modalities config (top-level train_dataloader) is read; in a lorafit config give the model itself "
    "and set parallelism: {{component_key: parallelism, variant_key: fsdp2}}"
)


@register_component("model", "fsdp_wrapped", FSDPWrappedConfig)
def build_fsdp_wrapped(config: FSDPWrappedConfig) -> nn.Module:
    """In a Modalities config, the model it wraps plus lorafit's parallelism (fsdp2; ddp for NO_SHARD).

    Never built: the block is translated when the config is checked (lorafit/modalities/sharding.py); elsewhere it
    is refused."""
    raise UserError(_TRANSLATED.format(variant="model/fsdp_wrapped"))


@register_component("model", "fsdp2_wrapped", FSDP2WrappedConfig)
def build_fsdp2_wrapped(config: FSDP2WrappedConfig) -> nn.Module:
    """In a Modalities config, the model it wraps plus lorafit's parallelism fsdp2 (as fsdp_wrapped)."""
    raise UserError(_TRANSLATED.format(variant="model/fsdp2_wrapped"))


def say_not_honoured(wrapped: Pending | None) -> None:
    """Log the fsdp2_wrapped settings lorafit does not follow (memory, communication or the bf16 rounding of the
    reduction: said, not an error). `wrapped`: the checked block (modalities/sharding.py wrapped_model_block)."""
    cfg = wrapped.config if wrapped is not None and wrapped.variant_key == "fsdp2_wrapped" else None
    if not isinstance(cfg, FSDP2WrappedConfig):
        return
    for key, value, default in (
        ("mixed_precision_settings.reduce_dtype", cfg.mixed_precision_settings.reduce_dtype, "FP_32"),
        ("reshard_after_forward", cfg.reshard_after_forward, True),
        ("layers_per_fsdp_unit", cfg.layers_per_fsdp_unit, 1),
    ):
        if value != default:
            log.info(
                "model/fsdp2_wrapped %s %s: not honoured; lorafit reduces gradients in fp32, reshards every "
                "block after forward, one block a unit (docs/modalities.md)",
                key,
                value,
            )


def check_block_names(model: nn.Module, block_names: list[str], field: str) -> None:
    """The wrapping's block_names must be module classes of the model (Modalities' FSDP wrap policy)."""
    classes = {type(m).__name__ for m in model.modules()}
    missing = [name for name in block_names if name not in classes]
    if missing:
        raise UserError(
            f"{missing} are not module classes of the model (it has e.g. "
            f"{sorted(c for c in classes if 'Layer' in c or 'Block' in c)[:5]})",
            field=field,
        )


def parallelism_block(wrapped: Pending | None, *, activation_checkpointing: bool = False) -> dict[str, Any]:
    """lorafit's `parallelism` component for a checked `fsdp_wrapped` / `fsdp2_wrapped` component (its typed
    config; any other: fsdp2 in fp32, Modalities' sharding of an unwrapped model); activation checkpointing of every
    decoder block. fsdp2_wrapped's parameter dtype is the precision; gradients are reduced in fp32 regardless."""
    cfg = wrapped.config if wrapped is not None and wrapped.variant_key in FSDP_VARIANTS else None
    settings = getattr(cfg, "mixed_precision_settings", "FP_32")
    settings = getattr(settings, "param_dtype", settings)  # fsdp2_wrapped: FSDP2PrecisionConfig
    return {
        "component_key": "parallelism",
        "variant_key": "ddp" if getattr(cfg, "sharding_strategy", None) == "NO_SHARD" else "fsdp2",
        "config": {
            "mixed_precision": "bf16" if str(settings).startswith("BF_16") else "fp32",
            "activation_checkpointing": activation_checkpointing,
        },
    }


# ------------------------------------------------------------------------------------------------ optimizers
class AdamConfig(ComponentConfig):
    lr: float = Field(gt=0)
    wrapped_model: Component("model")
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    weight_decay_groups_excluded: list[str]


@dataclass
class ModalitiesOptimizer:
    kind: Literal["adam", "adam_w"]
    config: AdamConfig = field(repr=False)

    @property
    def lr(self) -> float:
        return self.config.lr

    def __call__(self, model: nn.Module) -> torch.optim.Optimizer:
        # Modalities: one group, every trainable parameter with weight_decay (no exclusions for HF models)
        params = [p for p in model.parameters() if p.requires_grad]
        c = self.config
        cls = torch.optim.AdamW if self.kind == "adam_w" else torch.optim.Adam
        return cls([{"params": params, "weight_decay": c.weight_decay}], lr=c.lr, betas=tuple(c.betas), eps=c.eps)


def _optimizer(kind: str, config: AdamConfig) -> ModalitiesOptimizer:
    # Modalities' get_optimizer_groups: with weight_decay 0 or no exclusions, one group of all trainable parameters;
    # else one group per entry of the model's weight_decay_groups (gpt2: linear, embedding, layernorm), and every
    # excluded name must be one of them. Its HuggingFacePretrainedModel has no groups ({}), so there Modalities
    # raises for any exclusion (lora branch: "group = X ... is not in models optimizer_module_groups = []").
    if config.weight_decay != 0 and config.weight_decay_groups_excluded:
        raise UserError(
            f"{config.weight_decay_groups_excluded}: Modalities' weight decay groups (linear, embedding, layernorm) "
            "belong to its own gpt2 model; a Hugging Face model has none, so Modalities refuses any exclusion too. "
            "Valid: [] (weight_decay on all trainable parameters, i.e. the LoRA A and B matrices), or weight_decay: 0",
            field="weight_decay_groups_excluded",
        )
    if config.weight_decay_groups_excluded:
        log.info(
            "optimizer.config.weight_decay_groups_excluded %s: no effect with weight_decay 0 (as in Modalities)",
            config.weight_decay_groups_excluded,
        )
    return ModalitiesOptimizer(kind, config)


@register_component("optimizer", "adam_w", AdamConfig)
def build_adam_w(config: AdamConfig) -> ModalitiesOptimizer:
    """torch AdamW over the trainable parameters (one group, weight_decay on all), Modalities' adam_w."""
    return _optimizer("adam_w", config)


@register_component("optimizer", "adam", AdamConfig)
def build_adam(config: AdamConfig) -> ModalitiesOptimizer:
    """torch Adam over the trainable parameters (weight_decay as L2), Modalities' adam."""
    return _optimizer("adam", config)


# ------------------------------------------------------------------------------------------------ schedulers
class _SchedulerBase(ComponentConfig):
    optimizer: Component("optimizer")
    last_epoch: int = Field(-1, ge=-1)
    verbose: bool = False  # torch's deprecated flag: no effect


# Modalities' scheduler variants: variant_key -> (torch scheduler, its config keys as Modalities checks them).
# Each key goes to the torch scheduler under its own name (but t_max -> T_max), with last_epoch.
_SCHEDULERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "onecycle_lr": (
        torch.optim.lr_scheduler.OneCycleLR,
        {
            "max_lr": (float | list[float], ...),
            "total_steps": (int | None, Field(None, gt=0)),
            "epochs": (int | None, Field(None, gt=0)),
            "steps_per_epoch": (int | None, Field(None, gt=0)),
            "pct_start": (float, Field(gt=0, le=1)),
            "anneal_strategy": (Literal["cos", "linear"], ...),
            "cycle_momentum": (bool, True),
            "base_momentum": (float | list[float], 0.85),
            "max_momentum": (float | list[float], 0.95),
            "div_factor": (float, Field(gt=0)),
            "final_div_factor": (float, Field(gt=0)),
            "three_phase": (bool, False),
        },
    ),
    "step_lr": (torch.optim.lr_scheduler.StepLR, {"step_size": (int, Field(gt=0)), "gamma": (float, Field(ge=0))}),
    "constant_lr": (
        torch.optim.lr_scheduler.ConstantLR,
        {"factor": (float, Field(ge=0, le=1)), "total_iters": (int, Field(gt=0))},
    ),
    "cosine_annealing_lr": (
        torch.optim.lr_scheduler.CosineAnnealingLR,
        {"t_max": (int, Field(gt=0)), "eta_min": (float, Field(ge=0))},
    ),
}
_TORCH_NAMES = {"t_max": "T_max"}


class DummyLRConfig(ComponentConfig):
    optimizer: Component("optimizer")


SCHEDULER_CONFIGS: dict[str, type[ComponentConfig]] = {
    kind: create_model(f"{kind.title().replace('_', '')}Config", __base__=_SchedulerBase, **fields)
    for kind, (_, fields) in _SCHEDULERS.items()
}
SCHEDULER_CONFIGS["dummy_lr"] = DummyLRConfig


@dataclass
class ModalitiesScheduler:
    kind: str
    config: Any = field(repr=False)

    def max_steps(self) -> int | None:
        """Steps after which torch's scheduler raises (OneCycleLR), else None."""
        c = self.config
        if self.kind == "onecycle_lr":
            return c.total_steps or c.epochs * c.steps_per_epoch
        return None

    def __call__(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        if self.kind == "dummy_lr":  # Modalities' DummyLRScheduler: the optimizer's lr throughout
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scheduler = _SCHEDULERS[self.kind][0]
        args = self.config.model_dump(exclude={"optimizer", "verbose"})
        return scheduler(optimizer, **{_TORCH_NAMES.get(k, k): v for k, v in args.items()})


def _register_scheduler(kind: str, doc: str) -> None:
    def build(config):
        if getattr(config, "last_epoch", -1) != -1:
            raise UserError(
                "last_epoch is Modalities' manual resume; lorafit resumes the schedule with --resume_from: leave it -1",
                field="last_epoch",
            )
        if kind == "onecycle_lr" and config.total_steps is None and not (config.epochs and config.steps_per_epoch):
            raise UserError("define total_steps or (epochs and steps_per_epoch)", field="total_steps")
        return ModalitiesScheduler(kind, config)

    build.__doc__ = doc
    register_component("scheduler", kind, SCHEDULER_CONFIGS[kind])(build)


for _kind, _doc in {
    "onecycle_lr": "torch OneCycleLR with the configured total_steps.",
    "step_lr": "torch StepLR.",
    "constant_lr": "torch ConstantLR.",
    "cosine_annealing_lr": "torch CosineAnnealingLR (t_max steps).",
    "dummy_lr": "The optimizer's lr, unchanged (Modalities' DummyLRScheduler).",
}.items():
    _register_scheduler(_kind, _doc)


# ------------------------------------------------------------------------------------------------ loss
class CLMCrossEntropyLossConfig(ComponentConfig):
    target_key: str
    prediction_key: str


@dataclass
class CLMCrossEntropyLoss:
    target_key: str
    prediction_key: str


@register_component("loss", "clm_cross_entropy_loss", CLMCrossEntropyLossConfig)
def build_clm_loss(config: CLMCrossEntropyLossConfig) -> CLMCrossEntropyLoss:
    """Token cross-entropy (ignore -100), mean per micro-batch, as Modalities' CLMCrossEntropyLoss."""
    return CLMCrossEntropyLoss(config.target_key, config.prediction_key)


# ------------------------------------------------------------------------------------------------ gradient clipping
class FSDPClipperConfig(ComponentConfig):
    wrapped_model: Component("model")
    norm_type: str
    max_norm: float = Field(gt=0)


class FSDPLoggingOnlyConfig(ComponentConfig):
    wrapped_model: Component("model")
    norm_type: str


@dataclass
class Clipper:
    max_norm: float | None  # None: the norm is logged, nothing is clipped


def _check_norm(norm_type: str) -> None:
    if norm_type != "P2_NORM":
        raise UserError(f"norm_type {norm_type!r}: lorafit clips the L2 norm only (P2_NORM)", field="norm_type")


@register_component("gradient_clipper", "fsdp", FSDPClipperConfig)
def build_fsdp_clipper(config: FSDPClipperConfig) -> Clipper:
    """Clip the global gradient L2 norm to max_norm (over all shards)."""
    _check_norm(config.norm_type)
    return Clipper(config.max_norm)


@register_component("gradient_clipper", "fsdp_logging_only", FSDPLoggingOnlyConfig)
def build_logging_only_clipper(config: FSDPLoggingOnlyConfig) -> Clipper:
    """Only compute (and log) the global gradient norm."""
    _check_norm(config.norm_type)
    return Clipper(None)


class FSDP2ClipperMixin(ComponentConfig):
    """Modalities' FSDP2 clippers: the model as `model_parts` (`wrapped_model`, its deprecated alias, still
    accepted, as in Modalities) and the device mesh the norm is reduced over (lorafit's: every process)."""

    model_parts: Component("model") | None = None
    wrapped_model: Component("model") | None = None
    device_mesh: Component("device_mesh")

    @model_validator(mode="after")
    def _one_model(self) -> FSDP2ClipperMixin:
        if (self.model_parts is None) == (self.wrapped_model is None):
            raise ValueError("give the model as model_parts (or its deprecated alias wrapped_model), exactly once")
        return self


class FSDP2ClipperConfig(FSDP2ClipperMixin):
    norm_type: str
    max_norm: float = Field(gt=0)


class FSDP2LoggingOnlyConfig(FSDP2ClipperMixin):
    norm_type: str


register_component("gradient_clipper", "fsdp2", FSDP2ClipperConfig)(build_fsdp_clipper)
register_component("gradient_clipper", "fsdp2_logging_only", FSDP2LoggingOnlyConfig)(build_logging_only_clipper)


@register_component("gradient_clipper", "dummy", ComponentConfig)
def build_dummy_clipper(config: ComponentConfig) -> Clipper:
    """No clipping (lorafit still logs the gradient norm)."""
    return Clipper(None)
