"""The arithmetic of LoRA's variants, as PEFT defines them (peft/tuners/lora/dora.py, layer.py): DoRA's column
norm and merged weight, PiSSA's and OLoRA's initial factors, and the conversion of a PiSSA/OLoRA adapter into a
plain LoRA adapter of twice the rank that applies to the ORIGINAL base (PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)`).

Kept apart from the layers so that each formula can be read against PEFT's in one place.
"""

from __future__ import annotations

import math

import torch

# initialisations that move part of the base weight into the adapter (the base keeps the residual)
DECOMPOSING_INITS = ("pissa", "olora")


def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta||_2 of each output row (out,), W and delta in nn.Linear's (out, in) layout.

    DoRA (Liu et al. 2024, section 4.3) treats this norm as a constant in backward; callers detach `delta`
    (and the result), as PEFT does.
    """
    return torch.linalg.norm(weight + delta, dim=1)


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m * (W + delta) / ||W + delta||_c: the weight a DoRA layer computes with, (out, in), fp32."""
    combined = weight.float() + delta.float()
    factor = magnitude.float() / dora_weight_norm(combined, torch.zeros_like(combined))
    return factor.unsqueeze(1) * combined


def pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al. 2024): A, B from the top-r singular triplets of W (out, in), such that scaling * B @ A
    is W's best rank-r approximation. A full SVD, as PEFT's `init_lora_weights="pissa"`: O(out * in * min(out, in)),
    about 0.1 s per SmolLM2-135M projection on one core."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    sr = s[:r] / scaling
    a = torch.diag(torch.sqrt(sr)) @ vh[:r]
    b = u[:, :r] @ torch.diag(torch.sqrt(sr))
    return a.contiguous(), b.contiguous()


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz 2024): W = QR; A = R[:r], B = Q[:, :r] (PEFT does not divide by the scaling here)."""
    q, rr = torch.linalg.qr(weight.float())
    return rr[:r].contiguous(), q[:, :r].contiguous()


def initial_factors(init: str, weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    if init == "pissa":
        return pissa_factors(weight, r, scaling)
    if init == "olora":
        return olora_factors(weight, r)
    raise ValueError(f"{init!r} is not a decomposing initialisation ({', '.join(DECOMPOSING_INITS)})")


def converted_factors(
    a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[A; A0] and [B, -B0]: B'A' = BA - B0A0, the trained change relative to the original base (rank 2r).

    W_res + s BA = W - s B0A0 + s BA = W + s B'A'. PEFT's `LoraModel.subtract_mutated_init`.
    """
    return torch.cat([a, a0.to(a.dtype)], dim=0), torch.cat([b, -b0.to(b.dtype)], dim=1)


def converted_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha that keeps the scaling when the rank doubles (PEFT: x2, or x sqrt(2) under rsLoRA)."""
    return alpha * (math.sqrt(2) if use_rslora else 2)
