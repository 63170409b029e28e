"""The exact-match evaluator's time: one prefill of the prompts for loss and answers vs two separate passes.

    python benchmarks/evaluation_speed.py [--reps 2] [--threads 2] [--data data/task/test.jsonl] [--adapter DIR]

Two contenders on the same model and the same 64 held-out examples (the main job's evaluator settings:
batch 64, 32 new tokens), alternated, in one process (the time is what is compared; memory is
benchmarks/memory_parts.py's):
- `two_passes`: what the evaluator did before: the loss of every reference answer from a forward of prompt +
  answer (right padding, the head on the answer positions only), then `model.generate` on the left-padded prompts,
  which computes every prompt again.
- `one_prefill` (`lorafit.evaluation.score_chat`): each batch's prompts computed once into a KV cache (a prefix
  common to the batch once for the batch), the answers' loss continuing from it, the cache cut back, greedy
  generation continuing from it.
Both must give the same answers and the same loss (to 1e-5 relative), or the script fails. `--adapter` evaluates a
trained run's adapter (unmerged, as the evaluator after training sees it) instead of the base.
Writes benchmarks/results/evaluation_speed.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import (
    REPO,
    alternating,
    base_parser,
    fmt_summary,
    hardware,
    load_model,
    markdown_table,
    model_dir,
    ratio_summary,
    set_threads,
    summary,
    write_results,
)


@torch.no_grad()
def two_passes(model, tokenizer, examples, max_new_tokens: int, batch_size: int) -> tuple[float, list[str]]:
    """The loss pass and the generation pass apart, each computing the prompts."""
    from transformers import GenerationConfig

    from lorafit.evaluation.chat_scoring import _eos_ids, _prompt_ids
    from lorafit.training.loss import IGNORE_INDEX, CausalLMLoss

    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    prompts = [_prompt_ids(tokenizer, e) for e in examples]
    answers = [tokenizer(e.reference, add_special_tokens=False)["input_ids"] + [eos[0]] for e in examples]
    loss_fn, total, count = CausalLMLoss(model), 0.0, 0
    for start in range(0, len(examples), batch_size):
        rows = range(start, min(start + batch_size, len(examples)))
        width = max(len(prompts[i]) + len(answers[i]) for i in rows)
        ids = torch.full((len(rows), width), pad)
        mask, targets = torch.zeros_like(ids), torch.full_like(ids, IGNORE_INDEX)
        for row, i in enumerate(rows):
            seq = prompts[i] + answers[i]
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
            targets[row, len(prompts[i]) - 1 : len(seq) - 1] = torch.tensor(answers[i])
        total += float(loss_fn(input_ids=ids, labels=targets, attention_mask=mask))
        count += int((targets != IGNORE_INDEX).sum())
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad
    )
    texts = [""] * len(examples)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(rows):
            ids[row, width - len(prompts[i]) :], mask[row, width - len(prompts[i]) :] = torch.tensor(prompts[i]), 1
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row, i in enumerate(rows):
            new = out[row, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos), len(new))
            texts[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    return total / count, texts


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], reps=2)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "task" / "test.jsonl")
    parser.add_argument("--adapter", type=Path, default=None, help="a run's adapter/ folder (default: the base)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from lorafit.evaluation import load_examples, score_chat

    if args.adapter is not None:
        from lorafit.outputs.inference import load_with_adapter

        model, tokenizer = load_with_adapter(model_dir(args.model), args.adapter)
    else:
        from transformers import AutoTokenizer

        model, tokenizer = load_model(model_dir(args.model)), AutoTokenizer.from_pretrained(model_dir(args.model))
    model.eval()
    examples = load_examples(args.data)
    contenders = {
        "two_passes": lambda: two_passes(model, tokenizer, examples, args.max_new_tokens, args.batch_size),
        "one_prefill": lambda: (lambda s: (s.loss, s.answers))(
            score_chat(model, tokenizer, examples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    outputs = {}
    for rep, name in alternating(list(contenders), args.reps):
        start = time.perf_counter()
        outputs[name] = contenders[name]()
        seconds[name].append(time.perf_counter() - start)
        print(f"rep {rep} {name}: {seconds[name][-1]:.1f} s, loss {outputs[name][0]:.6f}", flush=True)
    (loss_a, answers_a), (loss_b, answers_b) = outputs["two_passes"], outputs["one_prefill"]
    same_answers = sum(a == b for a, b in zip(answers_a, answers_b, strict=True))
    if same_answers != len(examples) or abs(loss_a - loss_b) > 1e-5 * abs(loss_a):
        raise SystemExit(f"the contenders disagree: {same_answers}/{len(examples)} answers, loss {loss_a} vs {loss_b}")
    table = {name: summary(values) for name, values in seconds.items()}
    ratio = ratio_summary(seconds["one_prefill"], seconds["two_passes"])
    rows = [[name, fmt_summary(s, 3, " s")] for name, s in table.items()]
    rows.append(["one_prefill / two_passes", fmt_summary(ratio, 2, "x")])
    text = markdown_table(["contender", "seconds"], rows)
    print(text)
    print(f"same answers: {same_answers}/{len(examples)}; loss {loss_a:.6f} vs {loss_b:.6f}")
    write_results(
        args.out,
        "evaluation_speed",
        {
            "hardware": hardware(),
            "threads": args.threads,
            "data": str(args.data),
            "adapter": str(args.adapter) if args.adapter else None,
            "examples": len(examples),
            "seconds": seconds,
            "summary": table,
            "one_prefill_over_two_passes": ratio,
            "loss": {"two_passes": loss_a, "one_prefill": loss_b},
            "same_answers": same_answers,
            "table": text,
        },
    )


if __name__ == "__main__":
    main()
