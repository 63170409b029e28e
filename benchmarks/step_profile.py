"""Where the time of one LoRA training step goes, and what the candidate speed-ups change.

    python benchmarks/step_profile.py [--model DIR] [--reps 3]

The step of lorafit's engine (LoRA r=8 on q,k,v,o, micro batch 2 x 256 tokens, fp32) is cut into five phases,
timed separately by splitting the autograd graph at the decoder's output:
  decoder forward | head + cross-entropy forward | head + CE backward | decoder backward | optimizer step
The head + CE phases use lorafit's loss (`lorafit.training.loss.summed_cross_entropy`) with the chunk size
given. Then one profiled step lists the operators that take the time (self CPU time, forward + backward).

Variants, alternated within each repetition (ratios against `baseline` of the same repetition):
  baseline      SDPA attention, the head + CE over the whole micro-batch (this job's engine default)
  eager-attn    Hugging Face's eager attention (matmul + softmax) instead of SDPA
  chunked-ce    the head + CE in chunks of --chunk-tokens, recomputed in backward (less memory, more compute)
  bf16          bf16 autocast over the whole step (AVX2-only CPUs have no bf16 matmul instructions)
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from _common import (
    LORA_TARGETS,
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

NAME = "step_profile"
PHASES = ["decoder forward", "head+CE forward", "head+CE backward", "decoder backward", "optimizer"]
CATEGORIES = {  # operator name fragments -> what they are; the first category that matches wins
    "cross-entropy (log-softmax, NLL)": ("log_softmax", "nll_loss", "cross_entropy"),
    "matmul (linear layers, LoRA, head)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention (SDPA / softmax)": ("scaled_dot_product", "flash_attention", "aten::_softmax", "softmax_backward"),
    "optimizer (AdamW)": ("adam", "_foreach", "lerp", "addcdiv", "sqrt"),
}


def timed_step(model, head, ids, labels, optimizer, chunk_tokens, autocast) -> dict[str, float]:
    from lorafit.training.loss import summed_cross_entropy

    decoder = model.model
    t = [time.perf_counter()]
    with autocast():
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    t.append(time.perf_counter())
    cut = hidden.detach().requires_grad_()
    with autocast():
        loss = summed_cross_entropy(head, cut, labels, chunk_tokens) / labels.numel()
    t.append(time.perf_counter())
    loss.backward()
    t.append(time.perf_counter())
    hidden.backward(cut.grad)
    t.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t.append(time.perf_counter())
    return {phase: t[i + 1] - t[i] for i, phase in enumerate(PHASES)} | {"loss": float(loss.detach())}


def make_variant(base, name: str, args):
    import contextlib

    from lorafit.lora import apply_lora

    model = apply_lora(copy.deepcopy(base), r=8, alpha=16, target_layers=LORA_TARGETS, seed=0).train()
    if name == "eager-attn":
        model.set_attn_implementation("eager")
    chunk = args.chunk_tokens if name == "chunked-ce" else None
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "bf16" else contextlib.nullcontext
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, chunk, autocast, optimizer


def profile_ops(model, ids, labels, optimizer, top: int) -> tuple[list[list[str]], dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    from lorafit.training.loss import summed_cross_entropy

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        loss = summed_cross_entropy(model.lm_head, hidden, labels, None) / labels.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    shares = dict.fromkeys(CATEGORIES, 0.0)
    shares["other (norms, rotary, elementwise, copies)"] = 0.0
    for e in events:
        cat = next((c for c, keys in CATEGORIES.items() if any(k in e.key.lower() for k in keys)), None)
        shares[cat or "other (norms, rotary, elementwise, copies)"] += e.self_cpu_time_total / total
    rows = [
        [e.key, f"{e.self_cpu_time_total / 1000:.1f}", f"{100 * e.self_cpu_time_total / total:.1f} %", str(e.count)]
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    ]
    return rows, shares


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], reps=3)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--variants", default="baseline,eager-attn,chunked-ce,bf16")
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    args = parser.parse_args()
    set_threads(args.threads)
    path = model_dir(args.model)
    names = ["baseline", *(v for v in args.variants.split(",") if v and v != "baseline")]
    base = load_model(path)
    gen = torch.Generator().manual_seed(0)
    shape = (args.micro_batch_size, args.sequence_length)
    ids = torch.randint(0, base.config.vocab_size, shape, generator=gen)
    labels = torch.randint(0, base.config.vocab_size, shape, generator=gen)
    variants = {n: make_variant(base, n, args) for n in names}
    del base
    for n in names:  # warm-up step: allocations, kernel choice, optimizer state
        model, chunk, autocast, opt = variants[n]
        timed_step(model, model.lm_head, ids, labels, opt, chunk, autocast)

    times: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for rep in range(args.reps):
        for n in names[rep % len(names) :] + names[: rep % len(names)]:
            model, chunk, autocast, opt = variants[n]
            times[n].append(timed_step(model, model.lm_head, ids, labels, opt, chunk, autocast))
            print(f"  rep {rep + 1}/{args.reps} {n}: {sum(times[n][-1][p] for p in PHASES):.2f} s", flush=True)

    def step_s(n: str) -> list[float]:
        return [sum(t[p] for p in PHASES) for t in times[n]]

    phase_rows = []
    for p in PHASES:
        phase_rows.append([p, *(fmt_summary(summary([t[p] for t in times[n]]), unit=" s") for n in names)])
    phase_rows.append(["whole step", *(fmt_summary(summary(step_s(n)), unit=" s") for n in names)])
    phase_rows.append(
        ["step / baseline", *(fmt_summary(ratio_summary(step_s(n), step_s("baseline"))) + "x" for n in names)]
    )
    phase_table = markdown_table(["phase", *names], phase_rows)
    base_model, _, _, base_opt = variants["baseline"]
    op_rows, shares = profile_ops(base_model, ids, labels, base_opt, args.top)
    op_table = markdown_table(
        ["operator (baseline, forward + backward + AdamW)", "self CPU ms", "share", "calls"], op_rows
    )
    share_table = markdown_table(
        ["category", "share of self CPU time"], [[c, f"{100 * s:.1f} %"] for c, s in shares.items()]
    )
    med = {p: statistics.median(t[p] for t in times["baseline"]) for p in PHASES}
    total = sum(med.values())
    print(phase_table, op_table, share_table, sep="\n\n")
    print("baseline phases: " + ", ".join(f"{p} {fmt(100 * med[p] / total)} %" for p in PHASES))
    result = {
        "hardware": hardware(),
        "model": str(path),
        "settings": {
            "micro_batch_size": args.micro_batch_size,
            "sequence_length": args.sequence_length,
            "chunk_tokens": args.chunk_tokens,
            "reps": args.reps,
            "lora": "r=8 q,k,v,o",
        },
        "phases_s": {n: {p: summary([t[p] for t in times[n]]) for p in PHASES} for n in names},
        "step_s": {n: summary(step_s(n)) for n in names},
        "step_ratio_vs_baseline": {n: ratio_summary(step_s(n), step_s("baseline")) for n in names},
        # every variant trained its own copy on the same batches from the same adapter: same losses expected
        "loss_max_rel_diff_vs_baseline": {
            n: max(
                abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(times[n], times["baseline"], strict=True)
            )
            for n in names
        },
        "baseline_phase_share": {p: med[p] / total for p in PHASES},
        "operator_share": shares,
        "table": phase_table,
        "operator_table": op_table,
        "category_table": share_table,
    }
    fig, axes = new_figure(1, width=7.0)
    bottom = [0.0] * len(names)
    for p in PHASES:
        vals = [statistics.median(t[p] for t in times[n]) for n in names]
        axes[0].bar(names, vals, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    axes[0].set_ylabel("seconds (median)")
    axes[0].set_title(f"one LoRA step, {args.micro_batch_size} x {args.sequence_length} tokens", fontsize=10)
    axes[0].legend(fontsize=8)
    save_figure(fig, args.out, NAME)
    write_results(args.out, NAME, result)


if __name__ == "__main__":
    main()
