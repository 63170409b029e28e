"""What each of lorafit's speed/memory settings buys on a LoRA job, and whether the loss curve stays put.

    python benchmarks/engine_settings.py [--model DIR] [--reps 3] [--steps 8] [--variants default,one-chunk,...]

Variants (lorafit's engine, the job of vs_trainer_peft.py: LoRA r=8 on q,k,v,o, micro batch 2 x 256 tokens):
  default        the engine's defaults: fp32, output head + cross-entropy fused, over the target positions in
                 chunks of 256 (each chunk's gradient computed in forward: no logits wait for backward)
  chunked        default with chunks of --chunk-tokens target positions
  one-chunk      the fused head + cross-entropy over all target positions at once (loss_chunk_tokens=None)
  checkpointing  default + activation checkpointing of every decoder block
  compile        default + torch.compile of every decoder block (compile time falls in step 1, not counted)
  bf16           default + bf16 autocast
  malloc128k     glibc's malloc with its mmap threshold fixed at 128 KiB (mallopt; MALLOC_MMAP_THRESHOLD_=131072):
                 freed activations go back to the kernel instead of staying in a fragmented heap
  malloc1m       the same at 1 MiB (both malloc variants: glibc's malloc, which they tune)
  glibc          glibc's malloc instead of tbbmalloc, the allocator `lorafit run` re-executes under
  bf16-frozen    default + the frozen linear weights stored in bf16, computed in fp32 (model/lora frozen_dtype)
Variants combine with "+", e.g. checkpointing+malloc128k.
Each run is its own process; variants alternate; ratios are against `default` in the same repetition. The loss
difference is max over steps of |loss - loss_default| / loss_default.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import (
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
from _train_job import max_rel_diff, prepare_job, run_contenders

NAME = "engine_settings"
VARIANTS = {
    "default": {},
    "chunked": {"loss_chunk_tokens": 256},
    "one-chunk": {"loss_chunk_tokens": None},
    "checkpointing": {"activation_checkpointing": True},
    "compile": {"compile": True},
    "bf16": {"precision": "bf16"},
    "malloc128k": {"mmap_threshold": 128 * 1024, "allocator": "system"},
    "malloc1m": {"mmap_threshold": 1024 * 1024, "allocator": "system"},
    "glibc": {"allocator": "system"},
    "bf16-frozen": {"frozen_dtype": "bfloat16"},
}


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], reps=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=256, help="loss_chunk_tokens of the `chunked` variant")
    parser.add_argument(
        "--variants",
        default="default,one-chunk,checkpointing",
        help=f"comma-separated, from {', '.join(VARIANTS)}, or combined with + (default always runs)",
    )
    args = parser.parse_args()
    path = model_dir(args.model)
    names = ["default", *(v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "default")]
    known = {**VARIANTS, "chunked": {"loss_chunk_tokens": args.chunk_tokens}}
    unknown = [part for n in names for part in n.split("+") if part not in known]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)} (combined with +)")
    variants = {n: {k: v for part in n.split("+") for k, v in known[part].items()} for n in names}
    contenders = {n: ("lorafit", variants[n]) for n in names}
    with tempfile.TemporaryDirectory(prefix="lorafit-settings-") as tmp:
        job = dict(
            steps=args.steps,
            sequence_length=args.sequence_length,
            micro_batch_size=args.micro_batch_size,
            threads=args.threads,
        )
        spec = prepare_job(path, Path(tmp), job)
        print(f"job: {spec.steps} steps x {spec.tokens_per_step} tokens; variants: {', '.join(names)}")
        runs = run_contenders(spec, contenders, args.reps, Path(tmp))

    def per_run(name: str, key: str) -> list[float]:
        return [r[key] for r in runs[name]]

    rows, ratios = [], {}
    for n in names:
        ratios[n] = {
            "tokens_per_s": ratio_summary(per_run(n, "tokens_per_s"), per_run("default", "tokens_per_s")),
            "train_peak_rss": ratio_summary(per_run(n, "train_peak_rss_mb"), per_run("default", "train_peak_rss_mb")),
            "loss_max_rel_diff": max(
                max_rel_diff(a["losses"], b["losses"]) for a, b in zip(runs[n], runs["default"], strict=True)
            ),
        }
        rows.append(
            [
                n,
                fmt_summary(summary(per_run(n, "tokens_per_s"))),
                fmt_summary(ratios[n]["tokens_per_s"]) + "x",
                fmt_summary(summary(per_run(n, "train_peak_rss_mb")), digits=4),
                fmt_summary(ratios[n]["train_peak_rss"]) + "x",
                f"{100 * ratios[n]['loss_max_rel_diff']:.3g} %",
                fmt_summary(summary(per_run(n, "setup_s")), unit=" s"),
            ]
        )
    table = markdown_table(
        [
            "variant",
            "tokens/s",
            "vs default",
            "peak RSS by the last step (MiB)",
            "vs default",
            "max loss difference vs default",
            "set-up before training",
        ],
        rows,
    )
    print(table)
    print(f"(medians over {args.reps} repetitions, min-max in brackets)")
    spec_out = {k: v for k, v in spec.__dict__.items() if k not in ("data_prefix", "init_adapter")}
    result = {
        "hardware": hardware(),
        "model": str(path),
        "job": spec_out | {"tokens_per_step": spec.tokens_per_step},
        "reps": args.reps,
        "variants": {n: variants[n] for n in names},
        "ratios": ratios,
        "runs": runs,
        "table": table,
    }
    fig, axes = new_figure(3, width=4.5)
    bar_with_range(axes[0], names, [ratios[n]["tokens_per_s"] for n in names], "tokens/s vs default", "speed")
    bar_with_range(axes[1], names, [ratios[n]["train_peak_rss"] for n in names], "peak RSS vs default", "memory")
    for n in names:
        axes[2].plot(range(1, len(runs[n][0]["losses"]) + 1), runs[n][0]["losses"], marker=".", label=n)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("training loss")
    axes[2].set_title("loss curves (repetition 1)", fontsize=10)
    axes[2].legend(fontsize=8)
    save_figure(fig, args.out, NAME)
    write_results(args.out, NAME, result)


if __name__ == "__main__":
    main()
