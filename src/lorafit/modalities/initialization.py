"""Modalities' `model/model_initialized` and `model_initialization/composed`, with Modalities' meaning.

Modalities (`nn/model_initialization/*`, the same on the `lora` branch and main) re-draws parameters selected by
name: `plain` draws every weight matched by the model type's regexes from N(mean, std) (std "auto":
sqrt(2 / (5 hidden_dim))) and zeroes the matched biases; `scaled` then redraws the output projections with
std / sqrt(2 num_layers); `scaled_embed` then the embeddings with std sqrt(0.4). A regex must match the whole
parameter name (`re.fullmatch`) as Modalities' model names it.

What that means for a Hugging Face model, which Modalities wraps as `HuggingFacePretrainedModel` (every parameter
named `huggingface_model.<HF name>`): the `gpt2` patterns all start with `transformer.` or `lm_head.`, so they
match nothing and the pretrained weights stay as loaded; the `coca` patterns (every weight and bias whose name has
no `norm` / `ln_`) match every projection and embedding, so those are re-drawn (the pretrained values are lost
unless a `model/checkpointed` loads weights afterwards). lorafit does exactly that, with the same names, and says
in the log how many tensors were re-drawn (or that none matched) instead of doing it silently.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lorafit.config.context import current_context
from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.errors import UserError
from lorafit.models.deferred import initialize, is_pending

log = logging.getLogger(__name__)

# Modalities' NAMED_PARAMETER_INIT_GROUPS (parameter_name_filters.py): {model_type: {init type: (weights, biases)}}
_ATTN = r"transformer\.h\.\d+\.attn\."
PATTERNS: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "gpt2": {
        "plain": (
            [
                _ATTN + r"(q_attn|k_attn|v_attn|c_proj)\.weight",
                r"transformer\.h\.\w+\.mlp\.(W|V|W_2)\.weight",
                r"transformer\.h\.\w+\.mlp\.(c_fc|c_proj)\.weight",
                r"transformer\.wte\.weight",
                r"transformer\.wpe\.weight",
                r"lm_head\.weight",
            ],
            [
                _ATTN + r"(q_attn|k_attn|v_attn|c_proj)\.bias",
                r"transformer\.h\.\w+\.mlp\.(W|V|W_2)\.bias",
                r"transformer\.h\.\w+\.mlp\.(c_fc|c_proj)\.bias",
                r"lm_head\.bias",
            ],
        ),
        "scaled": (
            [
                _ATTN + r"c_proj\.weight",
                r"transformer\.h\.\w+\.mlp\.W_2.weight",
                r"transformer\.h\.\w+\.mlp\.c_proj\.weight",
            ],
            [],
        ),
        "scaled_embed": ([r"transformer\.wte\.weight", r"transformer\.wpe\.weight"], []),
    },
    "coca": {
        "plain": ([r"^(?!.*norm)(?!.*ln_).*\.weight$"], [r"^(?!.*norm)(?!.*ln_).*\.bias$"]),
        "scaled": ([], []),
        "scaled_embed": ([], []),
    },
}
# Modalities' name prefix for the parameters of a Hugging Face model (HuggingFacePretrainedModel.huggingface_model)
HF_PREFIX = "huggingface_model."


class ComposedInitializationConfig(ComponentConfig):
    """Modalities' ComposedModelInitializationConfig, with its checks."""

    model_type: Literal["gpt2", "coca"]
    weight_init_type: Literal["plain", "scaled", "scaled_embed"]
    mean: float
    std: float | Literal["auto"] = Field(union_mode="left_to_right")
    hidden_dim: int | None = Field(None, gt=0)
    num_layers: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_values(self) -> ComposedInitializationConfig:
        if self.std == "auto" and self.hidden_dim is None:
            raise ValueError("hidden_dim must be specified when std is 'auto'")
        if self.std != "auto" and self.std < 0:
            raise ValueError("std must be >= 0 or 'auto'")
        if self.std != "auto" and self.hidden_dim is not None:
            raise ValueError("hidden_dim must not be specified when std is a float value")
        if self.weight_init_type == "plain" and self.num_layers is not None:
            raise ValueError("num_layers must not be specified when weight_init_type is plain")
        if self.weight_init_type != "plain" and self.num_layers is None:
            raise ValueError("num_layers must be specified when weight_init_type is scaled or scaled_embed")
        return self


@dataclass(frozen=True)
class NormalInit:
    """One of Modalities' NamedParameterwiseNormalInitialization steps."""

    mean: float
    std: float
    weights: tuple[str, ...]
    biases: tuple[str, ...]


@dataclass(frozen=True)
class ComposedInitializer:
    steps: tuple[NormalInit, ...]

    def matches(self, names: list[str]) -> list[str]:
        """The names any step re-draws or zeroes (Modalities' re.fullmatch)."""
        regexes = [r for s in self.steps for r in (*s.weights, *s.biases)]
        return [n for n in names if any(re.fullmatch(r, n) for r in regexes)]

    @torch.no_grad()
    def initialize_in_place(self, named: list[tuple[str, nn.Parameter]]) -> None:
        for step in self.steps:
            for name, p in named:  # Modalities' loops: a weight that two regexes match is drawn twice
                for regex in step.weights:
                    if re.fullmatch(regex, name):
                        nn.init.normal_(p, mean=step.mean, std=step.std)
                for regex in step.biases:
                    if re.fullmatch(regex, name):
                        nn.init.zeros_(p)


@register_component("model_initialization", "composed", ComposedInitializationConfig)
def build_composed_initialization(config: ComposedInitializationConfig) -> ComposedInitializer:
    """Modalities' plain / scaled / scaled_embed normal initialisation of the parameters its regexes name."""
    groups = PATTERNS[config.model_type]
    std = math.sqrt(2 / (5 * config.hidden_dim)) if config.std == "auto" else float(config.std)
    steps = [NormalInit(config.mean, std, *map(tuple, groups["plain"]))]
    if config.weight_init_type in ("scaled", "scaled_embed"):
        steps.append(NormalInit(config.mean, std / math.sqrt(2 * config.num_layers), *map(tuple, groups["scaled"])))
    if config.weight_init_type == "scaled_embed":
        steps.append(NormalInit(config.mean, math.sqrt(0.4), *map(tuple, groups["scaled_embed"])))
    return ComposedInitializer(tuple(steps))


class WeightInitializedModelConfig(ComponentConfig):
    needs_whole_weights: ClassVar[str] = "re-draws loaded weights, which needs them before sharding"

    model: Component("model")
    model_initializer: Component("model_initialization")


def modalities_names(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's parameters under the names Modalities gives them (a Hugging Face model sits in its wrapper)."""
    from transformers import PreTrainedModel

    prefix = HF_PREFIX if isinstance(model, PreTrainedModel) else ""
    return [(prefix + name, p) for name, p in model.named_parameters()]


@register_component("model", "model_initialized", WeightInitializedModelConfig)
def build_weight_initialized_model(config: WeightInitializedModelConfig) -> nn.Module:
    """The model with the parameters the initializer names re-drawn in place (Modalities' model_initialized)."""
    model, init = config.model, config.model_initializer
    named = modalities_names(model)
    hit = init.matches([n for n, _ in named])
    kind = type(model).__name__
    if not hit:
        log.warning(
            "model_initialized: the initializer's name patterns match no parameter of %s (Modalities names them "
            "%s...): its weights stay as they are, as in Modalities",
            kind,
            named[0][0] if named else "-",
        )
        return model
    if current_context().meta_device:  # lorafit validate: nothing is loaded, nothing to draw
        return model
    if any(p.is_meta for _, p in named):
        raise UserError(f"{kind} is on the meta device: it has no values to initialise", field="model")
    if is_pending(model):  # weights allocated but not drawn yet: the model's own init first, as Modalities' models
        initialize(model)
    init.initialize_in_place(named)
    log.warning(
        "model_initialized: re-drew %d of %d parameter tensors of %s (e.g. %s); their previous (e.g. pretrained) "
        "values are replaced, as in Modalities",
        len(hit),
        len(named),
        kind,
        hit[0],
    )
    return model
