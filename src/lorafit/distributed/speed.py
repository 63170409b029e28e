"""What a run trains with when its config leaves it to lorafit: the precision (distributed/precision.py) and
whether torch.compile pays for the run's length (`parallelism.config.compile: auto`, the default), as one plan
that the log and `lorafit validate` both state.

Compiling costs a fixed time once, at the first steps (tracing and code generation for the decoder block; blocks
of one class share the compiled code), and then saves a fraction of every step. So it pays only when the run is
long enough:

    tokens per process x (1 / eager tokens/s - 1 / compiled tokens/s)  >  compile seconds

`MEASURED` holds the three numbers per (device, precision) where this project measured them, and where. The
break-even length is in tokens per process (steps x micro batch x accumulation x sequence length). For a larger
model than the measured one the eager rate is lower and the saving per token larger, so its true break-even
length is shorter than the table's: the rule keeps compile off for some runs where it would have paid (it is
conservative), and turns it on only past a length where the measured job gained. Where nothing was measured
(a GPU, so far) auto keeps compile off and says so; `compile: true` compiles regardless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.console import info
from lorafit.distributed.precision import resolve_precision


@dataclass(frozen=True)
class CompileMeasurement:
    compile_s: float  # the extra wall time of the compiling run over the eager one, at its start
    eager_tokens_s: float
    compiled_tokens_s: float
    where: str  # the machine and job

    @property
    def break_even_tokens(self) -> int:
        """Tokens per process after which the compiled run has caught up with the eager one."""
        saved_per_token = 1 / self.eager_tokens_s - 1 / self.compiled_tokens_s
        return int(self.compile_s / saved_per_token) if saved_per_token > 0 else 2**62


_AMX_XEON = "2-vCPU Intel Xeon with AMX: SmolLM2-135M LoRA r=8, 2 x 256 tokens"
# (device type, precision) -> measurement. CPU: lorafit's text job (benchmarks/vs_trainer_peft.py), tokens/s eager
# -> compiled, and the compile time (~24 s more process wall), measured 2026-11 on that machine (docs/benchmarks.md).
MEASURED: dict[tuple[str, str], CompileMeasurement] = {
    ("cpu", "fp32"): CompileMeasurement(24.0, 332.0, 359.0, _AMX_XEON),
    ("cpu", "bf16"): CompileMeasurement(24.0, 492.0, 615.0, _AMX_XEON),
}


def compile_pays(device_type: str, precision: str, tokens_per_process: int | None) -> tuple[bool, str]:
    """(compile?, why) for `compile: auto`: on when the run is past the measured break-even length."""
    measured = MEASURED.get((device_type, precision))
    if measured is None:
        return False, f"no measurement of torch.compile on {device_type} in {precision} (set compile: true to compile)"
    if tokens_per_process is None:
        return False, "the run's length is not known"
    need = measured.break_even_tokens
    compare = ">=" if tokens_per_process >= need else "<"
    why = (
        f"{tokens_per_process:,} training tokens per process {compare} {need:,}, where compiling (~"
        f"{measured.compile_s:.0f} s once, {measured.compiled_tokens_s / measured.eager_tokens_s:.2f}x the "
        f"tokens/s after) pays back ({device_type} {precision}, measured on a {measured.where})"
    )
    return tokens_per_process >= need, why


@dataclass(frozen=True)
class SpeedPlan:
    precision: str  # fp32 | bf16
    precision_why: str
    compile: bool
    compile_why: str

    def lines(self) -> list[str]:
        return [
            f"precision: {self.precision} ({self.precision_why})",
            f"compile: {'on' if self.compile else 'off'} ({self.compile_why})",
        ]


def plan_speed(
    mixed_precision: str,
    compile: bool | str,
    device: torch.device,
    tokens_per_process: int | None,
    *,
    flags: frozenset[str] | None = None,
    cuda_bf16: tuple[str, bool] | None = None,
    say: bool = True,
) -> SpeedPlan:
    """Resolve `mixed_precision` and `compile` (each `auto` or a setting) for a run of `tokens_per_process` on
    `device`; `flags`: the CPU's flags, `cuda_bf16`: (GPU name, has bf16) (default: this machine's); `say`:
    log the auto choices."""

    precision, precision_why = resolve_precision(mixed_precision, device, flags, say=say, cuda_bf16=cuda_bf16)
    if compile == "auto":
        on, why = compile_pays(device.type, precision, tokens_per_process)
        why = f"auto: {why}"
        if say:
            info(f"compile auto: {'on' if on else 'off'} ({why[6:]})")
    else:
        on, why = bool(compile), "as set"
    return SpeedPlan(precision, precision_why, on, why)
