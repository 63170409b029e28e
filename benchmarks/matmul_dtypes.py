"""Matrix-multiply throughput per number format on this CPU, at the shapes of a SmolLM2-135M training step.

    python benchmarks/matmul_dtypes.py [--reps 5] [--threads N] [--tokens 512]

A LoRA step is ~85% dense matmuls over frozen weights, so the speed any tool can reach is set by the fastest
arithmetic the CPU offers that keeps the loss within tolerance. Formats (y = x W^T, x tokens x in, W out x in):
  fp32       torch's fp32 GEMM (what both lorafit and the Trainer run in fp32)
  bf16/fp16  the same GEMM in 16-bit (bf16 autocast runs this); fast only with AVX512-BF16/AMX/AVX512-FP16
  int8-aten  torch._int_mm, int8 x int8 -> int32 (the only non-deprecated int8 GEMM in torch on CPU)
  int8-fbgemm torch.ao's dynamically quantized Linear (fbgemm), deprecated since torch 2.10
Each format is timed `--reps` times (alternated); GFLOP/s counts 2 * tokens * in * out per call.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch
from _common import (
    bar_with_range,
    base_parser,
    fmt,
    fmt_summary,
    hardware,
    markdown_table,
    new_figure,
    ratio_summary,
    save_figure,
    set_threads,
    summary,
    write_results,
)

NAME = "matmul_dtypes"
# (in, out) of SmolLM2-135M's linear layers: q/o, k/v, gate/up, down, and the output head
SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (576, 192),
    "gate_proj": (576, 1536),
    "down_proj": (1536, 576),
    "lm_head": (576, 49152),
}


def kernels(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    xb, wb, xh, wh = x.bfloat16(), w.bfloat16(), x.half(), w.half()
    xi = torch.randint(-127, 128, x.shape, dtype=torch.int8)
    wi = torch.randint(-127, 128, (w.shape[1], w.shape[0]), dtype=torch.int8)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w
    with warnings.catch_warnings():  # its deprecation warning: the reason it is measured, not used
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8
        )
    return {
        "fp32": lambda: torch.nn.functional.linear(x, w),
        "bf16": lambda: torch.nn.functional.linear(xb, wb),
        "fp16": lambda: torch.nn.functional.linear(xh, wh),
        "int8-aten": lambda: torch._int_mm(xi, wi),
        "int8-fbgemm": lambda: quantized(x),
    }


def seconds_per_call(fn: Callable[[], torch.Tensor], min_s: float = 0.2) -> float:
    fn()  # warm-up (packing, kernel selection)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s or calls < 1:  # int8-aten's head call takes ~8 s
        fn()
        calls += 1
    return elapsed / calls


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], reps=5)
    parser.add_argument("--tokens", type=int, default=512, help="rows of x: a 2 x 256 micro-batch")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="timing window per measurement")
    args = parser.parse_args()
    set_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    gflops: dict[str, dict[str, list[float]]] = {}
    for shape, (n_in, n_out) in SHAPES.items():
        x, w = torch.randn(args.tokens, n_in, generator=g), torch.randn(n_out, n_in, generator=g) * 0.02
        fns = kernels(x, w)
        per = gflops[shape] = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                per[name].append(2 * args.tokens * n_in * n_out / seconds_per_call(fn, args.min_seconds) / 1e9)
    names = list(next(iter(gflops.values())))
    # the step's mix: every shape weighted by its FLOPs (one layer: q,o at 576x576, k,v at 576x192, ...)
    weights = {"q_proj": 2, "k_proj": 2, "gate_proj": 2, "down_proj": 1, "lm_head": 1 / 30}
    step = {
        n: [
            sum(weights[s] * 2 * args.tokens * SHAPES[s][0] * SHAPES[s][1] for s in SHAPES)
            / sum(weights[s] * 2 * args.tokens * SHAPES[s][0] * SHAPES[s][1] / (gflops[s][n][i] * 1e9) for s in SHAPES)
            / 1e9
            for i in range(args.reps)
        ]
        for n in names
    }
    ratios = {n: ratio_summary(step[n], step["fp32"]) for n in names}
    rows = [[s, *(fmt(statistics.median(gflops[s][n])) for n in names)] for s in SHAPES]
    rows.append(["step mix", *(fmt(statistics.median(step[n])) for n in names)])
    rows.append(["step mix vs fp32", *(fmt_summary(ratios[n]) + "x" for n in names)])
    table = markdown_table(["GFLOP/s (median)", *names], rows)
    print(table)
    print(f"({args.tokens} tokens, medians over {args.reps} repetitions, min-max in brackets)")
    result = {
        "hardware": hardware(),
        "tokens": args.tokens,
        "reps": args.reps,
        "shapes": SHAPES,
        "gflops": gflops,
        "step_mix_gflops": step,
        "ratios_vs_fp32": ratios,
        "table": table,
    }
    fig, axes = new_figure(1, width=6.0)
    bar_with_range(axes[0], names, [summary(step[n]) for n in names], "GFLOP/s", "matmul throughput, step mix")
    save_figure(fig, args.out, NAME)
    write_results(args.out, NAME, result)


if __name__ == "__main__":
    main()
