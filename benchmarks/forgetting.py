"""How far fine-tuning moved a model from the base's own behaviour on another task: LoRA against full fine-tuning.

    python benchmarks/forgetting.py RUN_DIR [RUN_DIR ...] [--model-folder data/models/SmolLM2-135M]
                                    [--probe data/task/heldout.jsonl] [--out benchmarks/results]

The base model answers the probe prompts greedily (by default the quickstart task's 64 held-out prompts: another
task than the comparison task the runs trained on). Each fine-tuned model's loss on those very answers
(`heldout_loss`: nats per answer token) says how much of the base's behaviour there it kept: the base scores its
own greedy answers at a low loss, and the rise after fine-tuning is the drift ("LoRA learns less and forgets
less", Biderman et al. 2024, measures the same thing with benchmarks). RUN_DIRs are `lorafit run` folders (those
of benchmarks/variants.py): a LoRA run's `adapter/` is put on the fp32 base, a full run's `model/` loads as it is.
Runs on a 4-bit base would be judged on the wrong base here, so they are refused. Writes <out>/forgetting.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def _low_precision_base(node) -> bool:
    """Whether a run's resolved config has a `model/lora` with `frozen_dtype` set, wherever it sits."""
    if isinstance(node, dict):
        if node.get("variant_key") == "lora" and (node.get("config") or {}).get("frozen_dtype"):
            return True
        return any(_low_precision_base(value) for value in node.values())
    return isinstance(node, list) and any(_low_precision_base(value) for value in node)


def load_run(run: Path, base: Path):
    from transformers import AutoModelForCausalLM

    from lorafit.lora import load_adapter

    if (run / "model").is_dir():  # full fine-tuning: a plain Hugging Face folder
        return AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    if _low_precision_base(yaml.safe_load((run / "config.resolved.yaml").read_text())):
        raise SystemExit(f"{run}: trained on a low-precision base; its adapter on the fp32 base is another model")
    return load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run / "adapter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--model-folder", type=Path, default=REPO / "data" / "models" / "SmolLM2-135M")
    parser.add_argument("--probe", type=Path, default=REPO / "data" / "task" / "heldout.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.evaluation import ChatExample, generate_greedy, heldout_loss, load_examples

    tokenizer = AutoTokenizer.from_pretrained(args.model_folder)
    prompts = load_examples(args.probe)
    base = AutoModelForCausalLM.from_pretrained(args.model_folder, dtype=torch.float32)
    answers = generate_greedy(base, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=64)
    own = [ChatExample(ex.prompt, answer) for ex, answer in zip(prompts, answers, strict=True)]
    losses = {"base": heldout_loss(base, tokenizer, own)}
    print(f"base: {losses['base']:.4f} nats per token of its own answers ({len(own)} prompts of {args.probe.name})")
    for run in args.runs:
        losses[run.name] = heldout_loss(load_run(run, args.model_folder), tokenizer, own)
        print(f"{run.name}: {losses[run.name]:.4f}", flush=True)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "probe": args.probe.name,
        "n": len(own),
        "max_new_tokens": args.max_new_tokens,
        "base_answers": answers[:3],
        "runs": {run.name: str(run) for run in args.runs},
        "loss_on_base_answers": losses,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forgetting.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
