"""Checks that stop a run which would otherwise train nothing, or train garbage, silently.

Gradient flow: LoRA's B starts at zero (an embedding's A under PEFT's init), so in step 1 only that factor can
receive a gradient (the other's gradient goes through it: B^T (...) = 0); from step 2 on both must. A matrix with no
gradient, a zero one, or a non-finite one means the adapter is cut from the graph (a custom forward that bypasses
it, reentrant activation checkpointing over frozen inputs, a detach) and the run would end with an unchanged
adapter. It is checked once, before the optimizer steps.
A model without LoRA (full fine-tuning) is checked more loosely in step 1: some trainable parameter must get a
finite, non-zero gradient (a model may hold parameters the loss never uses, so not every one has to).
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.distributed.env import DistEnv
from lorafit.errors import UserError
from lorafit.lora.model import has_lora, lora_layers, named_lora_parameters
from lorafit.models.wrappers import canonical_name, local_tensor


class GradientFlowError(UserError):
    """Adapters received no usable gradient."""


class NonFiniteLossError(UserError):
    """The loss or the gradient norm became NaN or infinite."""


def check_gradient_flow(model: nn.Module, step: int, env: DistEnv) -> None:
    """After backward of optimizer step `step` (1: B matrices, 2: A and B) raise if any adapter lacks a gradient.

    Collective under DDP/FSDP2: per-matrix squared norms and non-finite counts are summed over ranks, since
    under FSDP2 each rank only sees its shard.
    """

    if not has_lora(model):
        if step == 1:
            _check_some_gradient(model, env)
        return
    # the factor initialised to zero is the one whose first gradient is non-zero: B of a linear layer (A is
    # random), A of an embedding under PEFT's init (A = 0, B random), B under Modalities' (embedding_init)
    first = _zero_started(model)
    wanted = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    params = [
        (n, p)
        for n, p in named_lora_parameters(model)
        if (n in first if step == 1 else any(f".{w}" in n for w in wanted))
    ]
    if not params:
        return
    stats = torch.zeros(len(params), 3, dtype=torch.float64, device=env.device)
    for i, (_, p) in enumerate(params):
        if p.grad is None:
            continue
        g = local_tensor(p.grad).detach().double()
        stats[i, 0] = g.pow(2).sum() if g.numel() else 0.0
        stats[i, 1] = (~torch.isfinite(g)).sum()
        stats[i, 2] = 1.0
    env.all_reduce_sum(stats)
    missing = [n for (n, _), s in zip(params, stats.tolist(), strict=True) if s[2] == 0]
    bad = [n for (n, _), s in zip(params, stats.tolist(), strict=True) if s[2] > 0 and s[1] > 0]
    zero = [n for (n, _), s in zip(params, stats.tolist(), strict=True) if s[2] > 0 and s[1] == 0 and s[0] == 0]
    if not (missing or bad or zero):
        return
    _report_divergence(params, first, missing + zero + bad, step, env)
    lines = []
    for label, names in (("no gradient", missing), ("a zero gradient", zero), ("a non-finite gradient", bad)):
        if names:
            shown = ", ".join(sorted(names)[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
            lines.append(f"{label}: {shown}")
    raise GradientFlowError(
        f"gradient-flow check failed after step {step}: {sum(map(len, (missing, zero, bad)))} of {len(params)} "
        f"adapter matrices got " + "; ".join(lines) + ". The adapters are not connected to the loss (a forward that "
        "bypasses the LoRA layers, a detach, or reentrant activation checkpointing over frozen inputs)"
    )


def _zero_started(model: nn.Module) -> set[str]:
    """The names of the factors that start at zero, which step 1 checks (`LoraLayer.zero_factor_suffix`)."""
    return {f"{canonical_name(name)}.{layer.zero_factor_suffix}" for name, layer in lora_layers(model)}


def _report_divergence(params: list, zero_started: set[str], failed: list[str], step: int, env: DistEnv) -> None:
    """Numbers first, wiring second: when the matrices that step 1 showed connected (those started at zero) get
    nothing usable in step 2, the wiring cannot have changed in between, the update did (e.g. lr 1e30: weights
    of 1e29 saturate every softmax and the gradients vanish). Raise NonFiniteLossError saying so."""
    first = [n for n, _ in params if n in zero_started]
    if step < 2 or not first or not set(first) <= set(failed):
        return
    stats = torch.zeros(2, dtype=torch.float64, device=env.device)  # squared weight norm, non-finite weights
    for _, p in params:
        w = local_tensor(p).detach().double()
        stats[0] += torch.nan_to_num(w, posinf=0.0, neginf=0.0).pow(2).sum() if w.numel() else 0.0
        stats[1] += (~torch.isfinite(w)).sum()
    square, non_finite = env.all_reduce_sum(stats).tolist()
    state = (
        f"{int(non_finite)} adapter weights are non-finite"
        if non_finite
        else f"the adapter weights' norm is {square**0.5:.3g}"
    )
    raise NonFiniteLossError(
        f"training diverged at step {step}: after step {step - 1}'s update the adapters get only zero or non-finite "
        f"gradients ({state}): the values blew up, the wiring is fine (step 1 checked it). Lower the learning rate "
        "(optimizer.config.lr)"
    )


def _check_some_gradient(model: nn.Module, env: DistEnv) -> None:
    """Full fine-tuning: raise unless the trainable parameters' gradients are, together, finite and non-zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    stats = torch.zeros(2, dtype=torch.float64, device=env.device)  # squared norm, non-finite count
    for p in params:
        if p.grad is not None:
            g = local_tensor(p.grad).detach().double()
            stats[0] += g.pow(2).sum() if g.numel() else 0.0
            stats[1] += (~torch.isfinite(g)).sum()
    env.all_reduce_sum(stats)
    square, non_finite = stats.tolist()
    if non_finite == 0 and square > 0:
        return
    got = f"{int(non_finite)} non-finite gradient values" if non_finite else "only zero or no gradients"
    raise GradientFlowError(
        f"gradient-flow check failed after step 1: the {len(params)} trainable parameters got {got}. "
        "The parameters are not connected to the loss (a detach, or a forward that does not use them)"
    )


def check_finite(loss: float, grad_norm: float, step: int, last_checkpoint: str | None) -> None:
    if torch.isfinite(torch.tensor([loss, grad_norm])).all():
        return
    kept = f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else "no checkpoint was written"
    what = f"loss is {loss}" if not torch.isfinite(torch.tensor(loss)) else f"gradient norm is {grad_norm}"
    raise NonFiniteLossError(
        f"training diverged at step {step}: the {what}; the optimizer did not step and {kept}. "
        "Lower the learning rate (optimizer.config.lr), clip gradients (settings.gradient_clipping), or use fp32 "
        "instead of bf16"
    )
