"""LoRA's numbers (r, alpha, dropout, init): their check at the public edges, and the scaling they give.

Checked once per edge: `apply_lora` for all its layers, a layer's constructor when a layer is made directly, an
adapter_config.json when read (lora/adapter.py); the typed model/lora config (lora/component.py) states the same
rules for pydantic, so a YAML run is checked before anything is built.
"""

from __future__ import annotations

import math
from typing import Literal

from lorafit.errors import Problem, UserError
from lorafit.lora.variants import DECOMPOSING_INITS

Init = Literal["kaiming", "gaussian", "pissa", "olora"]
INITS: tuple[str, ...] = ("kaiming", "gaussian", *DECOMPOSING_INITS)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """What B A is multiplied by: alpha / r, or with rsLoRA alpha / sqrt(r), which keeps the update's scale
    independent of r (Kalajdzievski 2023). PEFT's definition; the one place it is computed."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def hyper_problems(
    r, alpha, dropout, init: str | None = None, *, alpha_key: str = "alpha", dropout_key: str = "dropout"
) -> list[Problem]:
    """The problems of LoRA's numbers, wherever they come from: `apply_lora`'s arguments, a layer's, or an
    adapter_config.json (which names them `lora_alpha` / `lora_dropout` and has no `init`)."""
    problems = []
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(Problem("r", f"must be an integer >= 1, got {r!r}"))
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        problems.append(Problem(alpha_key, f"must be a number > 0, got {alpha!r}"))
    elif not math.isfinite(alpha):
        problems.append(Problem(alpha_key, f"must be a finite number, got {alpha!r}"))
    elif alpha <= 0:
        problems.append(Problem(alpha_key, f"must be a number > 0, got {alpha!r}"))
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        problems.append(Problem(dropout_key, f"must be a number in [0, 1), got {dropout!r}"))
    if init is not None and init not in INITS:
        problems.append(Problem("init", f"must be one of {', '.join(INITS)}, got {init!r}"))
    return problems


def check_hyper(r, alpha, dropout, init: str | None = None) -> None:
    """Raise one UserError naming every bad number: the check of the public edges (apply_lora, a layer's
    constructor). The typed model/lora config checks the same rules with pydantic."""
    problems = hyper_problems(r, alpha, dropout, init)
    if problems:
        raise UserError("", problems=problems)
