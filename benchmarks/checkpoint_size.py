"""Checkpoint size: a LoRA adapter folder vs a full-model checkpoint of the same model, in the same dtype.

    python benchmarks/checkpoint_size.py [--model DIR] [--reps 3]

The adapter is LoRA r=8 on q,k,v,o written by `lorafit.lora.save_adapter` (PEFT's format: adapter_config.json +
adapter_model.safetensors); the full checkpoint is `save_pretrained` of the merged model (config.json,
generation_config.json, model.safetensors). Tokenizer files are left out of both: they are the same for both.
Each dtype pair compares like with like (fp32 adapter vs fp32 model, bf16 vs bf16); the mixed row (fp32
adapter vs bf16 model, the smallest full checkpoint one would ship) is reported too, as it is the least
favourable to the adapter. Save times are alternated over the repetitions.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    LORA_TARGETS,
    bar_with_range,
    base_parser,
    fmt,
    fmt_summary,
    hardware,
    load_model,
    markdown_table,
    model_dir,
    new_figure,
    save_figure,
    set_threads,
    summary,
    write_results,
)

NAME = "checkpoint_size"


def folder_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def main() -> None:
    from lorafit.lora import apply_lora, count_parameters, merge_and_unload, save_adapter

    parser = base_parser(__doc__.split("\n")[0], reps=3)
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()
    set_threads(args.threads)
    path = model_dir(args.model)
    lora = apply_lora(load_model(path), r=args.r, alpha=2 * args.r, target_layers=LORA_TARGETS, seed=0)
    trainable, total = count_parameters(lora)
    merged = merge_and_unload(copy.deepcopy(lora))
    models = {
        "float32": (lora, merged),
        "bfloat16": (copy.deepcopy(lora).to(torch.bfloat16), copy.deepcopy(merged).to(torch.bfloat16)),
    }

    sizes: dict[str, dict[str, dict[str, int]]] = {}
    save_s: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="lorafit-ckpt-") as tmp:
        for rep in range(args.reps):
            for dtype, (adapter_model, full_model) in models.items():
                jobs = [
                    ("adapter", lambda d, m=adapter_model: save_adapter(m, d)),
                    ("full", lambda d, m=full_model: m.save_pretrained(d)),
                ]
                for kind, save in jobs if rep % 2 == 0 else jobs[::-1]:
                    target = Path(tmp) / f"{kind}-{dtype}-{rep}"
                    t = time.perf_counter()
                    save(target)
                    save_s.setdefault(f"{kind} {dtype}", []).append(time.perf_counter() - t)
                    sizes.setdefault(dtype, {})[kind] = folder_bytes(target)
                    shutil.rmtree(target)

    def total_bytes(dtype: str, kind: str) -> int:
        return sum(sizes[dtype][kind].values())

    pairs = [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")]
    rows, ratios = [], {}
    for adapter_dtype, full_dtype in pairs:
        a, f = total_bytes(adapter_dtype, "adapter"), total_bytes(full_dtype, "full")
        key = f"adapter_{adapter_dtype}_over_full_{full_dtype}"
        ratios[key] = a / f
        rows.append(
            [
                f"{adapter_dtype} adapter vs {full_dtype} full",
                f"{fmt(a / 1e6)} MB",
                f"{fmt(f / 1e6)} MB",
                f"{100 * a / f:.2f} %",
                fmt_summary(summary(save_s[f"adapter {adapter_dtype}"]), unit=" s"),
                fmt_summary(summary(save_s[f"full {full_dtype}"]), unit=" s"),
            ]
        )
    table = markdown_table(["comparison", "adapter", "full model", "adapter / full", "adapter save", "full save"], rows)
    print(table)
    print(
        f"LoRA r={args.r} on {','.join(LORA_TARGETS)}: {trainable:,} adapter parameters of {total:,} "
        f"({fmt(100 * trainable / total)} %)"
    )

    result = {
        "hardware": hardware(),
        "model": str(path),
        "settings": {"r": args.r, "alpha": 2 * args.r, "targets": LORA_TARGETS, "reps": args.reps},
        "adapter_parameters": trainable,
        "total_parameters": total,
        "files_bytes": sizes,
        "ratios": ratios,
        "save_s": {k: summary(v) for k, v in save_s.items()},
        "table": table,
    }
    fig, axes = new_figure(2)
    labels = [f"{a[:4]} vs {f[:4]}" for a, f in pairs]
    axes[0].bar(labels, [100 * ratios[f"adapter_{a}_over_full_{f}"] for a, f in pairs], color="#4c72b0")
    axes[0].axhline(1.0, color="red", lw=1, label="target: 1 %")
    axes[0].set_ylabel("adapter size / full checkpoint size (%)")
    axes[0].set_title("checkpoint size (adapter vs full)", fontsize=10)
    axes[0].legend(fontsize=8)
    keys = list(save_s)
    bar_with_range(axes[1], keys, [summary(save_s[k]) for k in keys], "seconds", "save time")
    axes[1].set_yscale("log")
    save_figure(fig, args.out, NAME)
    write_results(args.out, NAME, result)


if __name__ == "__main__":
    main()
