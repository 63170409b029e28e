"""The `model/lora` component: a model with LoRA adapters on its `target_layers`, base frozen.

    lora_model:
      component_key: model
      variant_key: lora
      config:
        model: {instance_key: hf_model, pass_type: BY_REFERENCE}
        r: 8
        alpha: 16
        target_layers: [q_proj, v_proj]   # or [all-linear], [mlp.down_proj], ["re:model\\.layers\\.0\\..*_proj"]
        dropout: 0.05                     # optional, adapter branch only
        init: kaiming                     # optional: kaiming (PEFT's default), gaussian, pissa or olora
        use_rslora: false                 # optional: scaling alpha/sqrt(r) instead of alpha/r
        use_dora: false                   # optional: DoRA, weight-decomposed LoRA (nn.Linear targets)
        embedding_init: peft              # optional: embedding adapters start A = 0, B ~ N(0, 1) (peft) or
                                          #   A ~ N(0, 1), B = 0 (modalities: what a Modalities config gets)
        frozen_dtype: bfloat16            # optional: store the frozen linear weights in bf16 (or nf4), compute in fp32
        # nf4_skip_layers: [down_proj]    # optional, with frozen_dtype: nf4 only: these layers stay bf16, not 4-bit

`frozen_dtype: nf4` stores them as 4-bit NF4 (QLoRA's data type, torchao's NF4Tensor; `pip install 'lorafit[nf4]'`):
about 1/8 of their fp32 memory, dequantised where they are used (lorafit/frozen/nf4.py); not with init pissa/olora.
`nf4_skip_layers` (target_layers' syntax) keeps the layers it names out of the 4-bit format and stores them in
bf16 instead, like bitsandbytes' `llm_int8_skip_modules` (for layers known to be sensitive to rounding). Which
layers to keep is the model's and task's question: docs/quality.md measures it on SmolLM2-135M.

`frozen_dtype: bfloat16` halves the memory of the frozen base's linear layers (not the output head): they are
rounded to bf16 once and cast up to the activations' dtype where they are used (lorafit/frozen/linear.py). It
cannot be combined with FSDP2, which all-gathers a layer's parameters in one dtype; use ddp or none.

`init: pissa` / `olora` start the adapter from the top of each base weight (SVD / QR, PEFT's definitions) and leave
the residual in the base; the saved adapter is converted to apply to the original base (twice the rank).
`use_dora: true` adds DoRA's trained magnitude vector per output feature (docs/lora.md).

Embeddings: name the nn.Embedding in `target_layers` (e.g. `[all-linear, embed_tokens]`, GPT-2: `wte`);
`all-linear` alone never includes embeddings nor the output head. Convolutions (nn.Conv1d/2d/3d) are named the
same way and take PEFT's conv adapter (lora/conv.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from lorafit.config.context import current_context
from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.console import info
from lorafit.errors import UserError
from lorafit.frozen.linear import store_frozen_linears
from lorafit.frozen.nf4 import store_nf4_linears
from lorafit.lora.matching import nf4_skip_names
from lorafit.lora.model import LoraSettings, dora_init_conflict, inject, trainable_summary
from lorafit.lora.variants import DECOMPOSING_INITS
from lorafit.models.file_pages import release_file_mapping


class LoraModelConfig(ComponentConfig):
    """LoRA on a built model. `target_layers`: leaf names, dotted suffixes, `re:<regex>` or `all-linear`."""

    model: Component("model")
    r: int = Field(ge=1)
    alpha: float = Field(gt=0)
    target_layers: list[str] = Field(min_length=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    embedding_init: Literal["peft", "modalities"] = "peft"  # how an embedding adapter's A and B are drawn
    frozen_dtype: Literal["bfloat16", "nf4"] | None = None  # None: the frozen weights keep the base model's dtype
    nf4_skip_layers: list[str] = Field(default_factory=list)  # with nf4: these layers are stored in bf16 instead

    @field_validator("target_layers")
    @classmethod
    def _named(cls, targets: list[str]) -> list[str]:
        if any(not t.strip() for t in targets):
            raise ValueError("every entry must be a non-empty string, e.g. [q_proj, v_proj] or [all-linear]")
        return targets

    @field_validator("use_dora")
    @classmethod
    def _dora_with_init(cls, use_dora: bool, info: ValidationInfo) -> bool:
        if use_dora and info.data.get("init") in DECOMPOSING_INITS:
            raise ValueError(dora_init_conflict(info.data["init"]))
        return use_dora


@register_component("model", "lora", LoraModelConfig)
def build_lora_model(config: LoraModelConfig) -> nn.Module:
    """A model with LoRA adapters on `target_layers` (base frozen; works on meta-device models)."""
    model = config.model
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch model, got {type(model).__name__}", field="model")
    if config.frozen_dtype == "nf4" and config.init in DECOMPOSING_INITS:
        reason = "the residual base would have to be re-quantised after the decomposition; use kaiming or gaussian"
        raise UserError(f"init {config.init} cannot be combined with frozen_dtype nf4: {reason}", field="init")
    in_bf16 = _nf4_skipped(model, config)
    # the numbers were checked once, by this typed config: inject (not apply_lora, the Python API's check)
    settings = LoraSettings(
        r=config.r,
        alpha=config.alpha,
        target_layers=list(config.target_layers),
        modules={},
        dropout=config.dropout,
        use_rslora=config.use_rslora,
        init=config.init,
        use_dora=config.use_dora,
        embedding_init=config.embedding_init,
    )
    # A and B drawn once, here, from the run's seed (run/build.py puts it into the build context)
    inject(
        model,
        settings,
        list(config.target_layers),
        field_name="target_layers",
        each_must_match=True,
        seed=current_context().adapter_seed,
    )
    if config.frozen_dtype:
        info(store_frozen_base(model, config.frozen_dtype, in_bf16))
    if current_context().announce:
        info(trainable_summary(model))
    return model


def store_frozen_base(model: nn.Module, frozen_dtype: str, nf4_skipped: set[str] = frozenset()) -> str:
    """Store the frozen linear weights as `frozen_dtype` says (with nf4: those in `nf4_skipped` in bf16); what
    was done, for the log. Also the benchmarks' way to do what `frozen_dtype` does."""
    if frozen_dtype != "nf4":
        changed = store_frozen_linears(model, getattr(torch, frozen_dtype))
        return f"frozen weights of {changed} linear layers stored in {frozen_dtype}, computed in fp32"
    # the skipped layers first, without releasing the file: that would copy every weight still in the file (the
    # fp32 weights about to be quantised) into memory (benchmark job with checkpointing: peak 989 MiB instead of 783)
    if nf4_skipped:
        store_frozen_linears(model, torch.bfloat16, only=nf4_skipped, release_file=False)
    changed = store_nf4_linears(model, skip=nf4_skipped)
    if nf4_skipped and not changed:
        release_file_mapping(model)  # store_nf4_linears releases it only when it quantised something
    also = f"; {len(nf4_skipped)} named in nf4_skip_layers kept in bfloat16" if nf4_skipped else ""
    return f"frozen weights of {changed} linear layers stored as NF4 (4-bit, torchao){also}, computed in fp32"


def _nf4_skipped(model: nn.Module, config: LoraModelConfig) -> set[str]:
    """The qualified names `nf4_skip_layers` selects (resolved before the adapters go in, on the plain model)."""
    if not config.nf4_skip_layers:
        return set()
    if config.frozen_dtype != "nf4":
        raise UserError(
            f"only applies with frozen_dtype: nf4 (got frozen_dtype: {config.frozen_dtype}); "
            "remove it or set frozen_dtype: nf4",
            field="nf4_skip_layers",
        )
    return nf4_skip_names(model, config.nf4_skip_layers)
