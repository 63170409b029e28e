"""The training objective as a module: decoder -> output head -> cross-entropy, SUMMED over target positions.

`CausalLMLoss(model)` is what the training step calls, `loss(input_ids=..., labels=...)`, and what parallelism
wraps: DDP prepares its gradient reduction in the wrapper's forward and FSDP2 all-gathers the root's parameters
(embeddings, final norm, tied head) in the root's forward, so the module that runs decoder and head must be the
root. The Hugging Face model sits inside it as `causal_lm`, unchanged (its forward is never replaced).

The loop divides the sum by the number of target tokens of the whole global batch (all micro-batches, all
ranks), so one process and N processes give the same loss. Labels are already shifted by the datasets
(labels[t] is the target of position t, -100 = ignored), so no shift happens here.

Only the positions that have a target go through the head (an instruction job masks its prompts, so most
positions do not), chunk by chunk. For a plain linear head the head and the cross-entropy are fused
(`linear_cross_entropy`): each chunk's gradient is computed right there in the forward pass, so a chunk's fp32
logits exist only while its loss and gradient are computed; what waits for backward is the gradient of the
hidden states (positions x hidden size), never the logits (positions x vocabulary). A head with a LoRA adapter
is called as a module on the selected positions (chunked, recomputed in backward), so its adapter trains.
Models whose head does more than a matmul (logit soft-capping, scaling) use their own forward, with the
cross-entropy over chunks of their logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafit.data.blocks import IGNORE_INDEX  # the label the datasets give positions without a loss
from lorafit.models.wrappers import HoldsModel


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def summed_cross_entropy(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None
) -> torch.Tensor:
    """Sum of CE of `head(hidden)` against `labels`, over chunks of about `chunk_tokens` positions.

    For heads that are not a plain linear layer; `linear_cross_entropy` is the fused form for those that are.
    """
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


def _fused_chunks(hidden, weight, bias, targets, rows: int, need: tuple[bool, bool, bool]):
    """(sum of CE, d/d hidden, d/d weight, d/d bias) of `hidden @ weight.T + bias`, `rows` positions at a time.

    d(sum CE)/d(logits) = softmax(logits) - onehot(target), so each chunk's gradients are ready as soon as its
    logits are. Gradients not asked for in `need` (hidden, weight, bias) come back as None.
    """
    need_h, need_w, need_b = need
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start : start + rows], targets[start : start + rows]
        logits = torch.nn.functional.linear(h, weight, bias).float()
        target_logit = logits.gather(1, y[:, None]).squeeze(1)
        # log-sum-exp and softmax in place: the chunk's logits are the only buffer of chunk x vocabulary
        peak = logits.amax(dim=-1, keepdim=True)
        exp = logits.sub_(peak).exp_()
        sums = exp.sum(dim=-1, keepdim=True)
        total += (peak + sums.log()).squeeze(1).sub(target_logit).sum()
        if any(need):
            probs = exp.div_(sums)
            probs[torch.arange(len(y), device=y.device), y] -= 1.0  # minus the one-hot target
            if need_h:
                grad_hidden[start : start + rows] = probs.to(weight.dtype) @ weight
            if need_w:
                grad_weight += probs.t() @ h.float()
            if need_b:
                grad_bias += probs.sum(0)
    return total, grad_hidden, grad_weight, grad_bias


class _LinearCrossEntropy(torch.autograd.Function):
    """The fused head + CE as one autograd node: backward only scales the gradients forward stored.

    That saves the logits' memory and the second head matmul that recomputing them (checkpointing) would cost;
    what waits for backward is d(loss)/d(hidden), rows x hidden size (and the head's gradient if it trains).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        total, *grads = _fused_chunks(hidden, weight, bias, targets, rows, tuple(ctx.needs_input_grad[:3]))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.has = tuple(g is not None for g in grads)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        stored = iter(ctx.saved_tensors)
        pairs = zip(ctx.has, ctx.dtypes, strict=True)
        grads = [(next(stored) * grad_out).to(dtype) if has else None for has, dtype in pairs]
        return *grads, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_tokens: int | None = 256
) -> torch.Tensor:
    """Sum of token CE of `head(hidden)` against `labels` (-100: ignored), fused and chunked.

    Only positions with a target reach the head, `chunk_tokens` of them at a time (None: all at once).
    """
    flat_hidden, flat_labels = hidden.flatten(0, -2), labels.flatten()
    keep = flat_labels != IGNORE_INDEX
    if not bool(keep.all()):
        flat_hidden, flat_labels = flat_hidden[keep], flat_labels[keep]
    rows = max(1, chunk_tokens or flat_hidden.shape[0])
    if not torch.is_grad_enabled():  # evaluation: the loss alone
        return _fused_chunks(flat_hidden, head.weight, head.bias, flat_labels, rows, (False, False, False))[0]
    return _LinearCrossEntropy.apply(flat_hidden, head.weight, head.bias, flat_labels, rows)


class CausalLMLoss(HoldsModel):
    """Summed token cross-entropy (fp32) of a Hugging Face causal LM: the module the step calls and parallelism
    wraps. `forward(input_ids, labels, attention_mask=None, position_ids=None, **model_inputs)`.

    `position_ids` (and any other model input) go to the decoder unchanged: packed batches pass positions that
    restart at each document, from which transformers' attention keeps documents apart.
    """

    def __init__(self, causal_lm: nn.Module, chunk_tokens: int | None = 256):
        super().__init__()
        self.causal_lm = causal_lm
        # target positions per chunk of the head + CE (None: all at once); 256 SmolLM2 rows = 48 MiB of fp32
        # logits, and on CPU the head runs as fast in chunks of 256 as in one piece
        self.chunk_tokens = chunk_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **model_inputs,
    ) -> torch.Tensor:
        if position_ids is not None:
            # packed documents (lorafit.data.blocks): transformers builds the block-diagonal causal mask from the
            # position restarts only when no 2D mask is given; padding restarts at 0 too, so it is a document of its own
            attention_mask = None
        inputs = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False, **model_inputs}
        return summed_causal_lm_loss(self.causal_lm, labels, self.chunk_tokens, input_ids=input_ids, **inputs)


def summed_causal_lm_loss(
    causal_lm: nn.Module, labels: torch.Tensor, chunk_tokens: int | None = 256, **model_inputs
) -> torch.Tensor:
    """Summed token CE of `causal_lm(**model_inputs)` against `labels` (already shifted, -100: ignored), with the
    head on the target positions only where the logits are a plain head over the decoder's hidden states."""
    parts = plain_head(causal_lm)
    if parts is None:  # the model's own forward (full logits), CE over chunks of them
        logits = causal_lm(**model_inputs).logits
        return summed_cross_entropy(nn.Identity(), logits, labels, chunk_tokens)
    decoder, head = parts
    hidden = decoder(**model_inputs).last_hidden_state
    return head_cross_entropy(hidden, head, labels, chunk_tokens)


def head_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_tokens: int | None = 256
) -> torch.Tensor:
    """Sum of token CE of `head(hidden)` at the positions with a target: fused for a plain nn.Linear head; a head
    with an adapter (LoRA on lm_head) runs as a module on those positions, so its adapter gets gradients."""
    if type(head) is nn.Linear:
        return linear_cross_entropy(hidden, head, labels, chunk_tokens)
    flat_hidden, flat_labels = hidden.flatten(0, -2), labels.flatten()
    keep = flat_labels != IGNORE_INDEX
    return summed_cross_entropy(head, flat_hidden[keep][None], flat_labels[keep][None], chunk_tokens)


def plain_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
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
