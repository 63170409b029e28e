"""The tiny LoRA run config of the in-process run tests, and reading what a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOREM = REPO / "data" / "lorem_ipsum" / "lorem_ipsum.txt"


def tiny_config(model_dir: Path, cache: Path, *, steps: int = 6, r: int = 4, checkpoint_every: int = 2) -> dict:
    return {
        "settings": {
            "seed": 7,
            "step_profile": {
                "local_train_micro_batch_size": 2,
                "gradient_accumulation_steps": 2,
                "sequence_length": 32,
            },
            "training_target": {"num_target_steps": steps},
            "intervals": {
                "training_log_interval_in_steps": 1,
                "checkpointing_interval_in_steps": checkpoint_every,
                "evaluation_interval_in_steps": 3,
            },
            "checkpointing": {"keep_last": 2},
            "eval_max_batches": 4,
        },
        "tokenizer": {"component_key": "tokenizer", "variant_key": "huggingface", "config": {"path": str(model_dir)}},
        "base_model": {
            "component_key": "model",
            "variant_key": "huggingface_pretrained_model",
            "config": {"model_name_or_path": str(model_dir)},
        },
        "model": {
            "component_key": "model",
            "variant_key": "lora",
            "config": {
                "r": r,
                "alpha": 8,
                "target_layers": ["q_proj", "v_proj"],
                "model": {"instance_key": "base_model", "pass_type": "BY_REFERENCE"},
            },
        },
        "train_dataset": {
            "component_key": "dataset",
            "variant_key": "text",
            "config": {
                "path": str(LOREM),
                "cache_path": str(cache / "lorem"),
                "tokenizer": {"instance_key": "tokenizer", "pass_type": "BY_REFERENCE"},
            },
        },
        "eval_datasets": {"lorem": {"instance_key": "train_dataset", "pass_type": "BY_REFERENCE"}},
        "optimizer": {"component_key": "optimizer", "variant_key": "adamw", "config": {"lr": 3e-3}},
        "scheduler": {"component_key": "scheduler", "variant_key": "cosine", "config": {"warmup_steps": 1}},
    }


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter_tensors(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")
