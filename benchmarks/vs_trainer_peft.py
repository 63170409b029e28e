"""lorafit vs transformers.Trainer + peft on the same LoRA job: tokens/s, peak RSS, loss-curve difference.

    python benchmarks/vs_trainer_peft.py [--model DIR] [--reps 3] [--steps 12] [--variants lorafit:fp32,hf:fp32]
                                         [--data text|instruction]

The job (both contenders): SmolLM2-135M, LoRA r=8 (alpha 16, no dropout) on q,k,v,o, micro batch 2 x 256
tokens, the same packed token blocks in the same order, AdamW (lr 1e-3, no weight decay), cosine decay to
zero without warmup, gradient clipping at 1.0, and the same initial adapter (written once by lorafit, loaded by
PEFT), so the loss curves are comparable step by step. Each run is its own process (peak RSS is that process's
own, imports and model load included); contenders alternate within every repetition and the first one rotates.

Each tool runs under its own default memory allocator unless a variant says otherwise: lorafit under tbbmalloc
(`lorafit run` re-executes itself under it, lorafit/allocator.py), the Trainer under glibc's malloc; the
variants +tbbmalloc / +glibc swap them, so the allocator's share of a difference is measured, not assumed.

tokens/s counts steps 2..N (step 1 allocates and warms kernels up); peak RSS is the child's ru_maxrss; the loss
difference is max over steps of |loss_lorafit - loss_hf| / loss_hf. "Best setting" is, for each tool, its
variant with the highest median tokens/s among the variants measured (e.g. bf16 autocast, which Hugging Face
documents as the CPU setting for Trainer, or torch.compile); "leanest" is each tool's variant with the lowest
median peak RSS (e.g. with activation checkpointing), reported when it differs from the fastest.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import (
    LORA_TARGETS,
    bar_with_range,
    base_parser,
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
from _train_job import DATA_CHOICES, max_rel_diff, prepare_job, run_contenders

NAME = "vs_trainer_peft"
TOOLS = {"lorafit": "lorafit", "hf": "Trainer+PEFT"}


def parse_variant(text: str) -> tuple[str, tuple[str, dict]]:
    """'lorafit:fp32+compile' -> ('lorafit:fp32+compile', ('lorafit', {'precision': 'fp32', 'compile': True}))."""
    tool, _, settings = text.strip().partition(":")
    precision, *flags = (settings or "fp32").split("+")
    known = {
        "compile": ("compile", True),
        "checkpointing": ("activation_checkpointing", True),
        "tbbmalloc": ("allocator", "tbbmalloc"),
        "glibc": ("allocator", "system"),
        "bf16base": ("frozen_dtype", "bfloat16"),
        "nf4base": ("frozen_dtype", "nf4"),
        "attnbf16": ("nf4_skip_targets", True),
    }
    lorafit_only = {"bf16base", "nf4base", "attnbf16"}
    bad_flag = any(f not in known for f in flags) or (tool != "lorafit" and lorafit_only & set(flags))
    bad_flag = bad_flag or ("attnbf16" in flags and "nf4base" not in flags)
    if tool not in TOOLS or precision not in ("fp32", "bf16") or bad_flag:
        raise SystemExit(
            f"bad variant {text!r}: TOOL:PRECISION[+compile][+checkpointing][+tbbmalloc|+glibc]"
            "[+bf16base|+nf4base[+attnbf16] (lorafit only)], "
            f"TOOL in {list(TOOLS)}, PRECISION fp32 or bf16"
        )
    return f"{tool}:{settings or 'fp32'}", (tool, {"precision": precision, **dict(known[f] for f in flags)})


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], reps=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--targets",
        nargs="+",
        default=list(LORA_TARGETS),
        help="LoRA target layers of both contenders (default: q,k,v,o); e.g. all-linear",
    )
    parser.add_argument(
        "--data",
        choices=list(DATA_CHOICES),
        default="text",
        help="; ".join(f"{k}: {v}" for k, v in DATA_CHOICES.items()).replace("%", "%%"),
    )
    parser.add_argument(
        "--variants",
        default="lorafit:fp32,hf:fp32",
        help="comma-separated TOOL:SETTINGS, TOOL lorafit or hf, SETTINGS fp32 or bf16 plus optional "
        "+compile, +checkpointing (activation checkpointing), +tbbmalloc or +glibc (the process's malloc; default: "
        "each tool's own, i.e. tbbmalloc for lorafit as `lorafit run` re-executes under it, glibc for the Trainer), "
        "+bf16base (lorafit only: frozen_dtype bfloat16, the frozen base stored in bf16, computed in fp32), "
        "+nf4base (lorafit only: frozen_dtype nf4, the frozen base stored as 4-bit NF4), +nf4base+attnbf16 (the "
        "adapted layers stored in bf16 instead: nf4_skip_layers naming the targets), "
        "e.g. lorafit:fp32+compile,hf:bf16+tbbmalloc. "
        "bf16 autocast is 5-15x slower on CPUs without AVX512-BF16 or AMX (docs/benchmarks.md)",
    )
    args = parser.parse_args()
    path = model_dir(args.model)
    contenders = dict(parse_variant(v) for v in args.variants.split(",") if v.strip())
    if {tool for tool, _ in contenders.values()} != set(TOOLS):
        raise SystemExit(f"--variants needs at least one variant of each tool ({', '.join(TOOLS)})")
    precisions = [p for p in ("fp32", "bf16") if all(f"{tool}:{p}" in contenders for tool in TOOLS)]

    with tempfile.TemporaryDirectory(prefix="lorafit-vs-hf-") as tmp:
        work = Path(tmp)
        spec = prepare_job(
            path,
            work,
            dict(
                steps=args.steps,
                sequence_length=args.sequence_length,
                micro_batch_size=args.micro_batch_size,
                gradient_accumulation_steps=args.accumulation,
                lr=args.lr,
                threads=args.threads,
                targets=args.targets,
            ),
            data=args.data,
        )
        print(f"job: {spec.steps} steps x {spec.tokens_per_step} tokens; contenders: {', '.join(contenders)}")
        runs = run_contenders(spec, contenders, args.reps, work)

    def per_run(name: str, key: str) -> list[float]:
        return [r[key] for r in runs[name]]

    best = {
        tool: max(
            (n for n in contenders if contenders[n][0] == tool),
            key=lambda n: summary(per_run(n, "tokens_per_s"))["median"],
        )
        for tool in TOOLS
    }
    comparisons = {p: (f"lorafit:{p}", f"hf:{p}") for p in precisions}
    comparisons["best"] = (best["lorafit"], best["hf"])
    leanest = {
        tool: min(
            (n for n in contenders if contenders[n][0] == tool),
            key=lambda n: summary(per_run(n, "peak_rss_bytes"))["median"],
        )
        for tool in TOOLS
    }
    if leanest != best:
        comparisons["leanest"] = (leanest["lorafit"], leanest["hf"])
    ratios, rows = {}, []
    for label, (ours, theirs) in comparisons.items():
        speed = ratio_summary(per_run(ours, "tokens_per_s"), per_run(theirs, "tokens_per_s"))
        rss = ratio_summary(per_run(ours, "peak_rss_bytes"), per_run(theirs, "peak_rss_bytes"))
        loss = max(max_rel_diff(a["losses"], b["losses"]) for a, b in zip(runs[ours], runs[theirs], strict=True))
        ratios[label] = {
            "lorafit": ours,
            "hf": theirs,
            "tokens_per_s": speed,
            "peak_rss": rss,
            "loss_max_rel_diff": loss,
        }
        title = {"best": f"fastest ({ours} vs {theirs})", "leanest": f"leanest ({ours} vs {theirs})"}.get(
            label, f"both {label}"
        )
        rows.append([title, fmt_summary(speed) + "x", fmt_summary(rss) + "x", f"{100 * loss:.3g} %"])
    table = markdown_table(
        ["comparison", "tokens/s lorafit / Trainer", "peak RSS lorafit / Trainer", "max loss difference"], rows
    )
    detail_rows = [
        [
            name,
            fmt_summary(summary(per_run(name, "tokens_per_s"))),
            fmt_summary(summary([b / 2**20 for b in per_run(name, "peak_rss_bytes")]), digits=4),
            fmt_summary(summary(per_run(name, "train_peak_rss_mb")), digits=4),
            fmt_summary(summary(per_run(name, "process_wall_s"))),
            f"{runs[name][0]['losses'][0]:.4f} -> {runs[name][0]['losses'][-1]:.4f}",
        ]
        for name in contenders
    ]
    detail = markdown_table(
        ["contender", "tokens/s", "peak RSS (MiB)", "peak RSS by the last step (MiB)", "process wall (s)", "loss"],
        detail_rows,
    )
    self_check = {}
    for name in runs:  # each setting against the fp32 run of the same tool: do the speed-ups keep the loss?
        reference = f"{contenders[name][0]}:fp32"
        if name != reference and reference in runs:
            self_check[name] = max_rel_diff(runs[name][0]["losses"], runs[reference][0]["losses"])
    print(table)
    print()
    print(detail)
    print(f"(medians over {args.reps} repetitions, min-max in brackets)")

    spec_out = {k: v for k, v in spec.__dict__.items() if k not in ("data_prefix", "init_adapter")}
    result = {
        "hardware": hardware(),
        "model": str(path),
        "data": args.data,
        "job": spec_out | {"tokens_per_step": spec.tokens_per_step},
        "reps": args.reps,
        "best": best,
        "leanest": leanest,
        "ratios": ratios,
        "loss_max_rel_diff_vs_fp32": self_check,
        "runs": runs,
        "table": table,
        "detail_table": detail,
    }
    fig, axes = new_figure(3, width=5.0)
    names = list(contenders)
    bar_with_range(axes[0], names, [summary(per_run(n, "tokens_per_s")) for n in names], "tokens/s", "throughput")
    bar_with_range(
        axes[1],
        names,
        [summary([b / 2**20 for b in per_run(n, "peak_rss_bytes")]) for n in names],
        "MiB",
        "peak RSS (whole process)",
    )
    for name in names:
        losses = runs[name][0]["losses"]
        axes[2].plot(range(1, len(losses) + 1), losses, marker=".", label=name)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("training loss")
    axes[2].set_title("loss curves (repetition 1)", fontsize=10)
    axes[2].legend(fontsize=8)
    save_figure(fig, args.out, NAME)
    write_results(args.out, NAME, result)


if __name__ == "__main__":
    main()
