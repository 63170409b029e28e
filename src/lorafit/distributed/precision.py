"""Which compute precision trains fastest on this machine, for `parallelism.config.mixed_precision`.

`bf16` autocast only pays where the hardware multiplies bf16 natively at a higher rate than fp32: CUDA GPUs
with bf16 support, and CPUs with AMX (Intel Sapphire Rapids and later: the `amx_bf16` flag). On other CPUs,
AVX512-BF16 included, bf16 autocast adds casts around fp32-speed kernels: measured 0.62x the tokens/s of fp32
on an AVX512-BF16 Xeon without AMX (SmolLM2-135M LoRA job: 194 vs 314 tokens/s, docs/benchmarks.md).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from lorafit.console import info, warn


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def fastest_precision(device: torch.device, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(`fp32` or `bf16`, why) for training on `device`; `flags`: the CPU's flags (default: this machine's)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} computes in bf16 natively"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no bf16 support"
    if device.type == "cpu":
        if "amx_bf16" in (cpu_flags() if flags is None else flags):
            return "bf16", "the CPU has AMX-BF16 matrix units"
        return "fp32", "the CPU has no AMX: bf16 autocast runs at fp32 speed plus casts"
    return "fp32", f"no measurement for {device.type}"


def resolve_precision(asked: str, device: torch.device, flags: frozenset[str] | None = None) -> str:
    """The precision to train in: `auto` becomes the fastest here (said in the log); a setting that is slower
    than the default (fp32) on this hardware is kept, with a warning."""
    best, why = fastest_precision(device, flags)
    if asked == "auto":
        info(f"mixed_precision auto: {best} ({why})")
        return best
    if asked == "bf16" and best == "fp32" and device.type == "cpu":
        warn(f"mixed_precision: bf16 trains slower than fp32 here ({why}; measured 0.62x the tokens/s on an "
             "AVX512-BF16 Xeon): set mixed_precision: fp32, or auto to pick the fastest")  # fmt: skip
    return asked
