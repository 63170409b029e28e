"""The tiny `lorafit run` configs of the tests (one builder, `tiny_run_config`), and reading what a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOREM = REPO / "data" / "lorem_ipsum" / "lorem_ipsum.txt"


def tiny_run_config(
    model_dir: Path,
    *,
    cache_path: Path,
    data: Path = LOREM,
    seed: int = 7,
    micro: int = 2,
    accum: int | None = 2,
    sequence_length: int = 32,
    steps: int = 4,
    intervals: dict | None = None,
    r: int = 4,
    alpha: float = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    shared_base: bool = True,
    eval_on_train: bool = False,
    evaluators: list | None = None,
    lr: float | None = 3e-3,
    scheduler: str | None = "cosine",
    **settings,
) -> dict:
    """The one tiny `lorafit run` config the tests build on: LoRA on the tiny Llama folder `model_dir`, trained on
    the text file `data` (cached at `cache_path`). `intervals` default: log every step, checkpoint every 2.
    `shared_base`: the base model is its own entity (`base_model`), else nested in the LoRA component.
    `accum`, `lr`, `scheduler` None: the key is left out (lorafit's default). `settings`: more `settings` keys."""
    step_profile = {"local_train_micro_batch_size": micro}
    if accum is not None:
        step_profile["gradient_accumulation_steps"] = accum
    step_profile["sequence_length"] = sequence_length
    intervals = intervals or {"training_log_interval_in_steps": 1, "checkpointing_interval_in_steps": 2}
    base = {
        "component_key": "model",
        "variant_key": "huggingface_pretrained_model",
        "config": {"model_name_or_path": str(model_dir)},
    }
    config: dict = {
        "settings": {
            "seed": seed,
            "step_profile": step_profile,
            "training_target": {"num_target_steps": steps},
            "intervals": intervals,
            **settings,
        },
        "tokenizer": {"component_key": "tokenizer", "variant_key": "huggingface", "config": {"path": str(model_dir)}},
    }
    if shared_base:
        config["base_model"] = base
    config["model"] = {
        "component_key": "model",
        "variant_key": "lora",
        "config": {
            "r": r,
            "alpha": alpha,
            "target_layers": list(targets),
            "model": {"instance_key": "base_model", "pass_type": "BY_REFERENCE"} if shared_base else base,
        },
    }
    config["train_dataset"] = {
        "component_key": "dataset",
        "variant_key": "text",
        "config": {
            "path": str(data),
            "cache_path": str(cache_path),
            "tokenizer": {"instance_key": "tokenizer", "pass_type": "BY_REFERENCE"},
        },
    }
    if eval_on_train:
        config["eval_datasets"] = {"lorem": {"instance_key": "train_dataset", "pass_type": "BY_REFERENCE"}}
    if evaluators is not None:
        config["evaluators"] = evaluators
    if lr is not None:
        config["optimizer"] = {"component_key": "optimizer", "variant_key": "adamw", "config": {"lr": lr}}
    if scheduler is not None:
        schedulers = {"cosine": {"warmup_steps": 1}, "constant": {}}
        config["scheduler"] = {"component_key": "scheduler", "variant_key": scheduler, "config": schedulers[scheduler]}
    return config


def tiny_config(model_dir: Path, cache: Path, *, steps: int = 6, r: int = 4, checkpoint_every: int = 2) -> dict:
    """The in-process run tests' run: evaluated on its own training data every 3 steps, the last 2 checkpoints kept."""
    intervals = {
        "training_log_interval_in_steps": 1,
        "checkpointing_interval_in_steps": checkpoint_every,
        "evaluation_interval_in_steps": 3,
    }
    return tiny_run_config(
        model_dir,
        cache_path=cache / "lorem",
        steps=steps,
        r=r,
        intervals=intervals,
        eval_on_train=True,
        checkpointing={"keep_last": 2},
        eval_max_batches=4,
    )


def evaluated_run_config(model_dir: Path, tmp: Path, loggers: dict | None = None, steps: int = 4) -> dict:
    """A run with lorafit's defaults for the optimizer and schedule, an eval dataset and an exact-match evaluator
    (3 chat questions written into `tmp`), for the output and tracker tests."""
    examples = [("Say yes.", "yes"), ("Say no.", "no"), ("Name a colour.", "red")]
    heldout = tmp / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in examples
        )
    )
    evaluator = {
        "component_key": "evaluator",
        "variant_key": "exact_match",
        "config": {"path": str(heldout), "max_new_tokens": 4, "name": "qa"},
    }
    intervals = {"training_log_interval_in_steps": 3, "evaluation_interval_in_steps": 2}
    return tiny_run_config(
        model_dir,
        cache_path=tmp / "lorem",
        seed=3,
        accum=None,
        steps=steps,
        intervals=intervals,
        shared_base=False,
        eval_on_train=True,
        evaluators=[evaluator],
        lr=None,
        scheduler=None,
        eval_max_batches=2,
        loggers=loggers or {},
    )


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter_tensors(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def checkpointed_model(model_key: str, checkpoint_path, *, device: int | str = "cpu", precision: str = "FP_32") -> dict:
    """The seed's shape: `model/checkpointed` loading `checkpoint_path` into the model entity `model_key`, with
    `checkpoint_loading: torch {device, precision}`."""
    loading = {
        "component_key": "checkpoint_loading",
        "variant_key": "torch",
        "config": {"device": device, "precision": precision},
    }
    return {
        "component_key": "model",
        "variant_key": "checkpointed",
        "config": {
            "checkpoint_loading": loading,
            "model": {"instance_key": model_key, "pass_type": "BY_REFERENCE"},
            "checkpoint_path": str(checkpoint_path),
        },
    }
