"""Inference latency: base model vs the LoRA-merged model (must be equal) vs the unmerged adapter (its overhead).

    python benchmarks/inference.py [--model DIR] [--reps 5]

Three contenders in one process, each a plain forward with no gradients:
  base      the model as loaded
  merged    LoRA r=8 on q,k,v,o with non-zero B (a trained-looking adapter), merged and unloaded
  unmerged  the same adapter left as separate A/B matmuls beside each frozen weight
Two workloads: a prefill (one forward over batch x prompt tokens) and greedy decoding of new tokens with the
KV cache (per-token latency, where the small extra matmuls of an unmerged adapter weigh most). Contenders are
alternated inside every repetition, the first one changing each time; ratios are taken per repetition.
"""

from __future__ import annotations

import copy
import statistics
import time

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
    ratio_summary,
    save_figure,
    set_threads,
    summary,
    write_results,
)

NAME = "inference"
CONTENDERS = ["base", "merged", "unmerged"]


def build_contenders(path, r: int, seed: int) -> tuple[dict[str, torch.nn.Module], float]:
    from lorafit.lora import apply_lora, merge_and_unload, named_lora_parameters

    base = load_model(path)
    lora = apply_lora(copy.deepcopy(base), r=r, alpha=2 * r, target_layers=LORA_TARGETS, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in named_lora_parameters(lora):
            if name.endswith("lora_B.weight"):  # B=0 is an untrained adapter: merging would change nothing
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    lora.eval()
    merged = merge_and_unload(copy.deepcopy(lora)).eval()
    probe = torch.randint(0, base.config.vocab_size, (1, 16), generator=gen)
    with torch.inference_mode():
        diff = (lora(probe).logits - merged(probe).logits).abs().max().item()
    return {"base": base, "merged": merged, "unmerged": lora}, diff


def time_prefill(model, ids: torch.Tensor, iters: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(iters):
            t = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - t)
    return min(times)  # the least-disturbed of back-to-back runs of the same call


def time_decode(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds per generated token: the median of the timed one-token forward passes over the KV cache (greedy),
    after an untimed prefill. Each token is timed on its own: no difference of two noisy timings (which went
    negative on a busy machine), so the result is a time, positive by construction."""
    times = []
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        for _ in range(new_tokens):
            token = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], reps=5)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_threads(args.threads)
    path = model_dir(args.model)
    models, merge_diff = build_contenders(path, args.r, args.seed)
    vocab = models["base"].config.vocab_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=gen)
    prompt = ids[:1, :32]
    for m in models.values():  # warm-up: first calls allocate and pick kernels
        time_prefill(m, ids, 1)
        time_decode(m, prompt, 3)

    prefill: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    decode: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    for rep in range(args.reps):
        order = CONTENDERS[rep % 3 :] + CONTENDERS[: rep % 3]  # rotate who goes first
        for name in order:
            prefill[name].append(time_prefill(models[name], ids, args.prefill_iters))
            decode[name].append(time_decode(models[name], prompt, args.new_tokens))

    result = {
        "hardware": hardware(),
        "model": str(path),
        "settings": vars(args) | {"model": str(path), "out": str(args.out)},
        "merged_vs_unmerged_max_abs_logit_diff": merge_diff,
        "prefill_s": {c: summary(v) for c, v in prefill.items()},
        "decode_s_per_token": {c: summary(v) for c, v in decode.items()},
        # the fastest repetition of each: on a loaded machine the least-disturbed estimate of each latency
        "ratios_of_minima": {
            f"{key}_{c}_over_base": min(data[c]) / min(data["base"])
            for key, data in (("prefill", prefill), ("decode", decode))
            for c in ("merged", "unmerged")
        },
        "ratios": {
            "prefill_merged_over_base": ratio_summary(prefill["merged"], prefill["base"]),
            "prefill_unmerged_over_base": ratio_summary(prefill["unmerged"], prefill["base"]),
            "decode_merged_over_base": ratio_summary(decode["merged"], decode["base"]),
            "decode_unmerged_over_base": ratio_summary(decode["unmerged"], decode["base"]),
        },
    }
    rows = []
    for label, key, data in [
        (f"prefill {args.batch}x{args.prompt_tokens} tokens (ms)", "prefill", prefill),
        ("decode (ms/token)", "decode", decode),
    ]:
        s = {c: summary([v * 1000 for v in data[c]]) for c in CONTENDERS}
        ratios = result["ratios"]
        low = result["ratios_of_minima"]
        rows.append(
            [
                label,
                *(fmt_summary(s[c]) for c in CONTENDERS),
                fmt_summary(ratios[f"{key}_merged_over_base"]),
                fmt_summary(ratios[f"{key}_unmerged_over_base"]),
                f"{fmt(low[f'{key}_merged_over_base'])} / {fmt(low[f'{key}_unmerged_over_base'])}",
            ]
        )
    table = markdown_table(
        [
            "workload",
            "base",
            "merged",
            "unmerged adapter",
            "merged / base",
            "unmerged / base",
            "fastest runs: merged / base, unmerged / base",
        ],
        rows,
    )
    result["table"] = table
    print(table)
    print(f"max |logits(unmerged) - logits(merged)| = {merge_diff:.2e}  (reps={args.reps}, medians, min-max)")

    fig, axes = new_figure(2)
    for ax, key, title in [
        (axes[0], "prefill", "prefill latency / base"),
        (axes[1], "decode", "decode latency / base"),
    ]:
        labels = ["merged / base", "unmerged / base"]
        sums = [result["ratios"][f"{key}_merged_over_base"], result["ratios"][f"{key}_unmerged_over_base"]]
        bar_with_range(ax, labels, sums, "latency ratio (1 = base)", title)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhspan(0.98, 1.02, color="green", alpha=0.15, label="within 2% of base")
        ax.set_ylim(0.8, max(1.2, max(s["max"] for s in sums) * 1.05))
        ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, args.out, NAME)
    write_results(args.out, NAME, result)


if __name__ == "__main__":
    main()
