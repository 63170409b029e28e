"""Precision names as configs write them: `fp32`, `FP_32`, `FP32`, `float32` all mean torch.float32."""

from __future__ import annotations

import torch

CANONICAL = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def dtype_name(value: object) -> str:
    """The canonical name (fp32 | bf16 | fp16) of a precision given as fp32, FP_32, FP32, float32 or a torch dtype.

    Raises ValueError with the valid choices (pydantic validators turn it into a config problem).
    """
    if isinstance(value, torch.dtype):
        for name, dtype in CANONICAL.items():
            if dtype == value:
                return name
    if isinstance(value, str):
        key = value.strip().lower().replace("_", "").removeprefix("torch.")
        key = _ALIASES.get(key, key)
        if key in CANONICAL:
            return key
    raise ValueError(f"unknown precision {value!r}; valid: fp32, bf16, fp16 (also FP_32, BF_16, FP_16, FP32, ...)")


def to_dtype(value: object) -> torch.dtype:
    return CANONICAL[dtype_name(value)]
