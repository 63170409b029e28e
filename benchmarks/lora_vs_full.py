"""lorafit LoRA vs lorafit full fine-tuning of the same model: step time and peak memory.

    python benchmarks/lora_vs_full.py [--model DIR] [--reps 3] [--steps 8] [--precision fp32]

Both run lorafit's training engine on the same job (micro batch 2 x 256 tokens, the same packed blocks in
order, AdamW, cosine schedule, gradient clipping), each run in its own process, alternating. LoRA is r=8 on
q,k,v,o; full fine-tuning trains every parameter. Step time is the mean over steps 2..N (step 1 warms up).

Why about 0.67 is the floor for the step-time ratio: a step is one forward (1 unit) and a backward that computes
input gradients (1 unit) and weight gradients (1 unit). Frozen weights need no weight gradients, so LoRA does
about 2 of the 3 units; full fine-tuning also pays for AdamW over all 135M parameters, LoRA over 0.9M.
Peak memory is the process's ru_maxrss; "during training" is the peak reached by the last step (before the
final checkpoint is written), as the engine logs it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import (
    bar_with_range,
    base_parser,
    fmt,
    fmt_summary,
    hardware,
    markdown_table,
    model_dir,
    new_figure,
    ratio_summary,
    save_figure,
    summary,
    write_results,
)
from _train_job import prepare_job, run_contenders

NAME = "lora_vs_full"


def step_time(result: dict) -> float:
    ends = result["step_end_s"]
    return ends[0] if len(ends) < 2 else (ends[-1] - ends[0]) / (len(ends) - 1)


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], reps=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    path = model_dir(args.model)
    contenders = {
        "lora": ("lorafit", {"mode": "lora", "precision": args.precision}),
        "full": ("lorafit", {"mode": "full", "precision": args.precision, "init_adapter": None}),
    }
    with tempfile.TemporaryDirectory(prefix="lorafit-lora-vs-full-") as tmp:
        spec = prepare_job(
            path,
            Path(tmp),
            dict(
                steps=args.steps,
                sequence_length=args.sequence_length,
                micro_batch_size=args.micro_batch_size,
                lr=args.lr,
                threads=args.threads,
            ),
        )
        print(f"job: {spec.steps} steps x {spec.tokens_per_step} tokens, {args.precision}; contenders: lora, full")
        runs = run_contenders(spec, contenders, args.reps, Path(tmp))
    for results in runs.values():
        for r in results:
            r["step_s"] = step_time(r)

    def per_run(name: str, key: str) -> list[float]:
        return [r[key] for r in runs[name]]

    ratios = {
        "step_time": ratio_summary(per_run("lora", "step_s"), per_run("full", "step_s")),
        "peak_rss": ratio_summary(per_run("lora", "peak_rss_bytes"), per_run("full", "peak_rss_bytes")),
        "train_peak_rss": ratio_summary(per_run("lora", "train_peak_rss_mb"), per_run("full", "train_peak_rss_mb")),
    }
    rows = [
        [
            name,
            fmt_summary(summary(per_run(name, "step_s")), unit=" s"),
            fmt_summary(summary([b / 2**20 for b in per_run(name, "peak_rss_bytes")]), digits=4),
            fmt_summary(summary(per_run(name, "train_peak_rss_mb")), digits=4),
            f"{runs[name][0]['losses'][0]:.4f} -> {runs[name][0]['losses'][-1]:.4f}",
        ]
        for name in contenders
    ]
    rows.append(
        [
            "LoRA / full",
            fmt_summary(ratios["step_time"]) + "x",
            fmt_summary(ratios["peak_rss"]) + "x",
            fmt_summary(ratios["train_peak_rss"]) + "x",
            "",
        ]
    )
    table = markdown_table(["", "step time", "peak RSS (MiB)", "peak RSS during training (MiB)", "loss"], rows)
    print(table)
    print(
        f"(medians over {args.reps} repetitions, min-max in brackets; floor of the step-time ratio ~0.67; "
        f"measured {fmt(ratios['step_time']['median'])})"
    )
    spec_out = {k: v for k, v in spec.__dict__.items() if k not in ("data_prefix", "init_adapter")}
    result = {
        "hardware": hardware(),
        "model": str(path),
        "job": spec_out | {"tokens_per_step": spec.tokens_per_step},
        "reps": args.reps,
        "ratios": ratios,
        "runs": runs,
        "table": table,
    }
    fig, axes = new_figure(3, width=4.0)
    bar_with_range(axes[0], list(contenders), [summary(per_run(n, "step_s")) for n in contenders], "s", "step time")
    bar_with_range(
        axes[1],
        list(contenders),
        [summary([b / 2**20 for b in per_run(n, "peak_rss_bytes")]) for n in contenders],
        "MiB",
        "peak RSS",
    )
    bar_with_range(
        axes[2], ["step time", "peak RSS"], [ratios["step_time"], ratios["peak_rss"]], "LoRA / full", "ratios"
    )
    axes[2].axhline(0.67, color="grey", ls="--", lw=1, label="step-time floor ~0.67")
    axes[2].axhline(0.70, color="red", lw=1, label="target 0.70")
    axes[2].legend(fontsize=8)
    save_figure(fig, args.out, NAME)
    write_results(args.out, NAME, result)


if __name__ == "__main__":
    main()
