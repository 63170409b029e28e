"""Running `lorafit` as a user does (a subprocess, or torchrun), on a tiny config: shared by the CLI tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOREM = REPO / "data" / "lorem_ipsum" / "lorem_ipsum.txt"


def tiny_run_config(
    model_dir: Path,
    data: Path,
    cache: Path,
    *,
    lr: float = 3e-3,
    micro: int = 2,
    accum: int = 2,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    steps: int = 4,
) -> dict:
    """A LoRA run of `steps` steps on the tiny Llama folder `model_dir`, text data `data`, checkpoints every 2."""
    return {
        "settings": {
            "seed": 7,
            "step_profile": {
                "local_train_micro_batch_size": micro,
                "gradient_accumulation_steps": accum,
                "sequence_length": 32,
            },
            "training_target": {"num_target_steps": steps},
            "intervals": {"training_log_interval_in_steps": 1, "checkpointing_interval_in_steps": 2},
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
                "r": 4,
                "alpha": 8,
                "target_layers": list(targets),
                "model": {"instance_key": "base_model", "pass_type": "BY_REFERENCE"},
            },
        },
        "train_dataset": {
            "component_key": "dataset",
            "variant_key": "text",
            "config": {
                "path": str(data),
                "cache_path": str(cache / "lorem"),
                "tokenizer": {"instance_key": "tokenizer", "pass_type": "BY_REFERENCE"},
            },
        },
        "optimizer": {"component_key": "optimizer", "variant_key": "adamw", "config": {"lr": lr}},
        "scheduler": {"component_key": "scheduler", "variant_key": "cosine", "config": {"warmup_steps": 1}},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lorafit(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """`lorafit ARGS` as a user types it: one process, or torchrun with `processes`."""
    if processes == 1:
        launcher = [sys.executable, "-m", "lorafit"]
    else:
        rendezvous = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                    str(processes), rendezvous, str(REPO / "src/lorafit/__main__.py")]  # fmt: skip
    command = [*launcher, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def lorafit_run(config_path: Path, root: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    """`lorafit run --config_file_path ... --experiments_root_path ... EXTRA`."""
    args = ["run", "--config_file_path", str(config_path), "--experiments_root_path", str(root), *extra]
    return lorafit(*args, processes=processes)
