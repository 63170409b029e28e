"""Which compute precision trains fastest on this machine, for `parallelism.config.mixed_precision` (default
`auto`: this choice, said in the log and by `lorafit validate`).

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


def fastest_precision(
    device: torch.device, flags: frozenset[str] | None = None, cuda_bf16: tuple[str, bool] | None = None
) -> tuple[str, str]:
    """(`fp32` or `bf16`, why) for training on `device`; `flags`: the CPU's flags (default: this machine's);
    `cuda_bf16`: (GPU name, has bf16) (default: asked of torch)."""
    if device.type == "cuda":
        name, bf16 = cuda_bf16 or (torch.cuda.get_device_name(device), torch.cuda.is_bf16_supported())
        if bf16:
            return "bf16", f"{name} computes in bf16 natively"
        return "fp32", f"{name} has no bf16 support"
    if device.type == "cpu":
        if "amx_bf16" in (cpu_flags() if flags is None else flags):
            return "bf16", "the CPU has AMX-BF16 matrix units"
        return "fp32", "the CPU has no AMX: bf16 autocast runs at fp32 speed plus casts"
    return "fp32", f"no measurement for {device.type}"


def resolve_precision(
    asked: str,
    device: torch.device,
    flags: frozenset[str] | None = None,
    *,
    say: bool = True,
    cuda_bf16: tuple[str, bool] | None = None,
) -> tuple[str, str]:
    """(the precision to train in, why): `auto` becomes the fastest here (said in the log unless `say` is
    false); a setting slower than fp32 on this hardware is kept, with a warning."""
    best, why = fastest_precision(device, flags, cuda_bf16)
    if asked == "auto":
        if say:
            info(f"mixed_precision auto: {best} ({why})")
        return best, f"auto: {why}"
    if asked == "bf16" and best == "fp32" and device.type == "cpu":
        warn(
            f"mixed_precision: bf16 trains slower than fp32 here ({why}; measured 0.62x the tokens/s on an "
            "AVX512-BF16 Xeon): set mixed_precision: fp32, or auto to pick the fastest"
        )
    return asked, "as set"
