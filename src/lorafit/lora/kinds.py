"""Which base module types get which LoRA layer, and the wrapping itself."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.layers import LoraConv1D, LoraLayer, LoraLinear

# exact base types we know how to wrap; a subclass may change forward (quantised, scaled embeddings), so no isinstance
LORA_CLASSES: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Embedding: LoraEmbedding,
    Conv1D: LoraConv1D,
}
SUPPORTED_TYPES = "nn.Linear, nn.Embedding, transformers Conv1D (GPT-2)"


def wrap(base: nn.Module, r: int, alpha: float, *, dropout: float, use_rslora: bool, init: str,
         use_dora: bool = False) -> LoraLayer:  # fmt: skip
    cls = LORA_CLASSES[type(base)]
    if use_dora:
        return cls(base, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init, use_dora=True)
    return cls(base, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init)
