"""The causal-LM loss as a SUM of token cross-entropies, computed without materialising the full logits.

The loop divides by the number of target tokens of the whole global batch (all micro-batches, all ranks), so
one process and N processes give the same loss. Labels are already shifted by the datasets (labels[t] is the
target of position t, -100 = ignored), so no shift happens here.

Why a forward override: DDP and FSDP2 only work when the wrapper's (root's) forward runs: DDP prepares its
gradient reduction there, FSDP2 all-gathers the root's parameters (embeddings, final norm, tied head) there.
So while `loss_forward(model)` is active the model's own `forward` is replaced by one that runs the decoder,
then the output head over chunks of positions, each chunk under activation checkpointing: the chunk's fp32
logits exist only while its loss is computed (in forward, and again in backward), never for the whole batch.
Models whose head does more than a matmul (logit soft-capping, scaling) use their own forward instead.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def summed_cross_entropy(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None
) -> torch.Tensor:
    """Sum of CE of `head(hidden)` against `labels`, over chunks of about `chunk_tokens` positions."""
    batch, length = labels.shape
    step = length if not chunk_tokens else max(1, min(length, chunk_tokens // max(1, batch)))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, length, step):
        h, y = hidden[:, start : start + step], labels[:, start : start + step]
        if torch.is_grad_enabled() and step < length:
            total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y)
    return total


def _plain_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, head) when logits are exactly head(decoder(...).last_hidden_state), else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    decoder = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    if not isinstance(head, nn.Linear) or not isinstance(decoder, nn.Module) or decoder is model:
        return None
    return decoder, head


def _forward_loss(self: nn.Module, input_ids, labels, attention_mask=None, *, chunk_tokens: int | None = None):
    parts = _plain_head(self)
    if parts is None:  # the model's own forward (full logits), CE over chunks of them
        logits = type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return summed_cross_entropy(nn.Identity(), logits, labels, chunk_tokens)
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return summed_cross_entropy(head, hidden, labels, chunk_tokens)


@contextlib.contextmanager
def loss_forward(model: nn.Module, chunk_tokens: int | None = 4096) -> Iterator[nn.Module]:
    """While active, `model(input_ids=..., labels=..., attention_mask=...)` returns the summed token CE (fp32)."""
    from lorafit.lora.model import unwrap

    inner = unwrap(model)
    inner.forward = types.MethodType(
        lambda self, input_ids, labels, attention_mask=None: _forward_loss(
            self, input_ids, labels, attention_mask, chunk_tokens=chunk_tokens
        ),
        inner,
    )
    try:
        yield model
    finally:
        del inner.forward  # back to the class's forward


def count_targets(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())
