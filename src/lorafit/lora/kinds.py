"""Which base module types get which LoRA layer, and the wrapping itself."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.lora.conv import LoraConv1d, LoraConv2d, LoraConv3d
from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.layers import LoraConv1D, LoraLayer, LoraLinear

# exact base types we know how to wrap; a subclass may change forward (quantised, scaled embeddings), so no isinstance
LORA_CLASSES: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Embedding: LoraEmbedding,
    Conv1D: LoraConv1D,
    nn.Conv1d: LoraConv1d,
    nn.Conv2d: LoraConv2d,
    nn.Conv3d: LoraConv3d,
}
SUPPORTED_TYPES = (
    "nn.Linear, nn.Embedding, transformers Conv1D (GPT-2), nn.Conv1d/Conv2d/Conv3d (groups=1, "
    "dilation=1, padding_mode='zeros')"
)


def wrap(
    base: nn.Module,
    r: int,
    alpha: float,
    *,
    dropout: float,
    use_rslora: bool,
    init: str,
    use_dora: bool = False,
    embedding_init: str = "peft",
    generator: torch.Generator | None = None,
) -> LoraLayer:
    """`base` as its LoRA layer; `use_dora` goes to nn.Linear only and `embedding_init` to embeddings only (the
    targets were checked for both before). A and B are drawn once, here, from `generator` (None: the global RNG)."""
    cls = LORA_CLASSES[type(base)]
    extra: dict = {"use_dora": True} if use_dora else {}
    if cls is LoraEmbedding:
        extra["embedding_init"] = embedding_init
    # the numbers were checked once for all layers (apply_lora, or the typed model/lora config)
    return cls.from_checked(
        base, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init, generator=generator, **extra
    )
