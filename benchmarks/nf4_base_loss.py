"""What 4-bit storage does to the base model before any training: held-out answer loss of the comparison task.

    python benchmarks/nf4_base_loss.py [--model-folder data/models/SmolLM2-135M] [--out benchmarks/results]

Loads the model once per storage choice and stores its frozen linear weights the way `model/lora`'s
`frozen_dtype` (and `nf4_skip_layers`) does (`lorafit.lora.component.store_frozen_base`, no adapter), then measures
the held-out answer loss of data/task_hard (64 conversations; the same measure as the runs' `eval_before.json`).
The choices: fp32 as loaded, bf16, NF4 everywhere, NF4 with the attention projections in bf16 (the
`nf4_attn_bf16` variant of benchmarks/variants.py), and NF4 on one kind of projection only (the rest fp32), to
see where the loss comes from. Writes <out>/nf4_base_loss.json and prints a table (docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
EVERY = ATTENTION + MLP
# name -> (frozen_dtype, the projections that stay out of NF4: bf16 with nf4_skip_layers, or fp32 when "keep fp32")
CHOICES: dict[str, tuple[str | None, list[str], bool]] = {
    "fp32 (as loaded)": (None, [], False),
    "bf16 everywhere": ("bfloat16", [], False),
    "nf4 everywhere": ("nf4", [], False),
    "nf4, attention in bf16 (nf4_attn_bf16)": ("nf4", ATTENTION, False),
    "nf4 on the attention only, MLP fp32": ("nf4", MLP, True),
    "nf4 on the MLP only, attention fp32": ("nf4", ATTENTION, True),
    **{f"nf4 on {kind} only": ("nf4", [k for k in EVERY if k != kind], True) for kind in EVERY},
}


def stored(model_folder: Path, frozen_dtype: str | None, out_of_nf4: list[str], keep_fp32: bool):
    from transformers import AutoModelForCausalLM

    from lorafit.frozen.nf4 import store_nf4_linears
    from lorafit.lora.component import store_frozen_base
    from lorafit.lora.matching import nf4_skip_names

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).requires_grad_(False).eval()
    skipped = nf4_skip_names(model, out_of_nf4) if out_of_nf4 else set()
    if keep_fp32:
        store_nf4_linears(model, skip=skipped)  # the skipped layers keep the loaded fp32
    elif frozen_dtype:
        store_frozen_base(model, frozen_dtype, skipped)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-folder", type=Path, default=REPO / "data" / "models" / "SmolLM2-135M")
    parser.add_argument("--heldout", type=Path, default=REPO / "data" / "task_hard" / "heldout.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from lorafit.evaluation import heldout_loss, load_examples

    tokenizer = AutoTokenizer.from_pretrained(args.model_folder)
    examples = load_examples(args.heldout)
    results = {}
    for name, (frozen_dtype, out_of_nf4, keep_fp32) in CHOICES.items():
        start = time.perf_counter()
        loss = heldout_loss(stored(args.model_folder, frozen_dtype, out_of_nf4, keep_fp32), tokenizer, examples)
        results[name] = loss
        print(f"{name:45s} held-out answer loss {loss:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": args.model_folder.name,
        "heldout": args.heldout.name,
        "n": len(examples),
        "heldout_answer_loss": results,
    }
    (args.out / "nf4_base_loss.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
