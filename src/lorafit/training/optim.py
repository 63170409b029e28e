"""Optimizer and learning-rate schedule components. Each builds a FACTORY, not the object itself:

the parameters exist only after the model is wrapped (DDP / FSDP2 replace them by DTensors) and the number of
steps only once the run's settings and world size are known. The loop calls `optimizer_factory(model)` and
`scheduler_factory(optimizer, total_steps)`.

    optimizer: {component_key: optimizer, variant_key: adamw, config: {lr: 2.0e-4, weight_decay: 0.01}}
    optimizer: {component_key: optimizer, variant_key: adamw, config: {lr: 1.0e-4, loraplus_lr_ratio: 16}}  # LoRA+
    scheduler: {component_key: scheduler, variant_key: cosine, config: {warmup_fraction: 0.05, min_lr_ratio: 0.1}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.errors import UserError

# names that mark parameters which weight decay should not pull to zero (biases, norm gains, embeddings' scales)
NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm")


class AdamWConfig(ComponentConfig):
    """AdamW over the trainable parameters; no weight decay on biases and normalisation weights."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+ (Hayou et al. 2024): B (and DoRA's magnitude) learn at lr x this ratio, A at lr"
    )


# LoRA+ puts these at lr x ratio; PEFT's create_loraplus_optimizer also puts every 1-D trainable there (DoRA's m)
LORAPLUS_FAST = ("lora_B.weight", "lora_embedding_B", "lora_magnitude_vector")


def decays(name: str, param: torch.Tensor) -> bool:
    lowered = name.lower()
    return param.ndim >= 2 and not any(marker in lowered for marker in NO_DECAY_MARKERS)


@dataclass
class OptimizerFactory:
    config: AdamWConfig

    def __call__(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW over `model`'s parameters that require grad, in two groups (with and without decay)."""
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        c = self.config
        ratio = c.loraplus_lr_ratio
        fast = [(n, p) for n, p in trainable if ratio is not None and n.endswith(LORAPLUS_FAST)]
        if ratio is not None and not fast:
            raise UserError(
                "loraplus_lr_ratio needs LoRA adapters (lora_B), and the model has none: drop it for full fine-tuning",
                field="optimizer.config.loraplus_lr_ratio",
            )
        fast_ids = {id(p) for _, p in fast}
        slow = [(n, p) for n, p in trainable if id(p) not in fast_ids]
        groups = []
        # the base-lr groups come first: the loop logs param_groups[0]'s lr as the run's lr
        for members, lr in ((slow, c.lr), (fast, c.lr * (ratio or 1.0))):
            decay = [p for n, p in members if decays(n, p)]
            no_decay = [p for n, p in members if not decays(n, p)]
            groups += [
                g
                for g in (
                    {"params": decay, "weight_decay": c.weight_decay, "lr": lr},
                    {"params": no_decay, "weight_decay": 0.0, "lr": lr},
                )
                if g["params"]
            ]
        return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps)

    @property
    def lr(self) -> float:
        return self.config.lr


@register_component("optimizer", "adamw", AdamWConfig)
def build_adamw(config: AdamWConfig) -> OptimizerFactory:
    """AdamW over the trainable (LoRA) parameters; weight-decay groups skip biases and norms."""
    return OptimizerFactory(config)


# --- schedules ---------------------------------------------------------------------------------------------------
class _SchedulerConfig(ComponentConfig):
    # Modalities configs pass the optimizer to the scheduler; here the run's optimizer is always used
    optimizer: Component("optimizer") | None = None


class ConstantConfig(_SchedulerConfig):
    """The optimizer's lr throughout, after an optional linear warmup."""

    warmup_steps: int = Field(0, ge=0)


class CosineConfig(_SchedulerConfig):
    """Linear warmup to the optimizer's lr, then cosine decay to lr x min_lr_ratio at the last step."""

    warmup_steps: int | None = Field(None, ge=0)
    warmup_fraction: float | None = Field(None, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _one_warmup(self) -> CosineConfig:
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ValueError("set warmup_steps or warmup_fraction, not both")
        return self


class OneCycleConfig(_SchedulerConfig):
    """torch's OneCycleLR over the run's steps (max_lr overrides the optimizer's lr)."""

    max_lr: float = Field(gt=0)
    pct_start: float = Field(0.3, gt=0, lt=1)
    div_factor: float = Field(25.0, gt=0)
    final_div_factor: float = Field(1e4, gt=0)
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    three_phase: bool = False
    total_steps: int | None = Field(None, ge=1, description="default: the run's number of steps")


@dataclass
class WarmupCosine:
    """lr factor at step s (a picklable callable: LambdaLR then saves and restores it with its state)."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0
    cosine: bool = True

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if not self.cosine:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class SchedulerFactory:
    config: Any

    def __call__(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        c = self.config
        if isinstance(c, OneCycleConfig):
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=c.max_lr,
                total_steps=c.total_steps or total_steps,
                pct_start=c.pct_start,
                anneal_strategy=c.anneal_strategy,
                cycle_momentum=c.cycle_momentum,
                base_momentum=c.base_momentum,
                max_momentum=c.max_momentum,
                div_factor=c.div_factor,
                final_div_factor=c.final_div_factor,
                three_phase=c.three_phase,
            )
        if isinstance(c, CosineConfig):
            warmup = c.warmup_steps if c.warmup_steps is not None else round((c.warmup_fraction or 0.0) * total_steps)
            schedule = WarmupCosine(warmup, total_steps, c.min_lr_ratio, cosine=True)
        else:
            schedule = WarmupCosine(c.warmup_steps, total_steps, cosine=False)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@register_component("scheduler", "constant", ConstantConfig)
def build_constant(config: ConstantConfig) -> SchedulerFactory:
    """Constant lr (after an optional linear warmup)."""
    return SchedulerFactory(config)


@register_component("scheduler", "cosine", CosineConfig)
def build_cosine(config: CosineConfig) -> SchedulerFactory:
    """Linear warmup, then cosine decay to min_lr_ratio x lr."""
    return SchedulerFactory(config)


@register_component("scheduler", "onecycle", OneCycleConfig)
def build_onecycle(config: OneCycleConfig) -> SchedulerFactory:
    """One-cycle schedule (torch.optim.lr_scheduler.OneCycleLR)."""
    return SchedulerFactory(config)
