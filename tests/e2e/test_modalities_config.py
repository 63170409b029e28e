"""Modalities' LoRA example config trains in lorafit: the shipped copy under `lorafit run`, and the verbatim shared
file (paths changed by sed, as a user would) under the seed's torchrun command with 2 processes; sizes shrunk only
on the command line. Checkpoints land where Modalities puts them: checkpoint_path/<experiment_id>/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_run import free_port

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "modalities" / "config_lorem_ipsum_lora.yaml"
VERBATIM = REPO / "tests" / "fixtures" / "modalities" / "config_lorem_ipsum_lora.yaml"  # the shared file, verbatim

# micro batch 1 x accumulation 2, 4 micro-batches per rank -> 2 steps; one eval batch per loader
SIZE = ["settings.training.sequence_length=128", "settings.training.local_train_micro_batch_size=1",
        "settings.training.gradient_acc_steps=2", "train_dataloader.config.fixed_num_batches=4",
        "val_dataloader.config.fixed_num_batches=1", "test_dataloader.config.fixed_num_batches=1"]  # fmt: skip


def _paths(tmp: Path) -> list[str]:
    return [f"settings.paths.checkpointing_path={tmp / 'ckpt'}", "evaluation_subscriber.config.mode=OFFLINE",
            f"evaluation_subscriber.config.directory={tmp / 'wandb'}"]  # fmt: skip


def _check_run(run_dir: Path, world: int) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2]  # log interval 2 (the config's)
    assert [r["tokens"] for r in rows if "loss" in r] == [2 * 2 * world * 128]
    assert any("eval/val/loss" in r for r in rows) and any("eval/test/loss" in r for r in rows)
    assert (run_dir / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    resolved = (run_dir / "config.resolved.yaml").read_text()
    assert "# command-line override: settings.training.gradient_acc_steps=2" in resolved
    assert yaml.safe_load(resolved)["settings"]["training"]["sequence_length"] == 128


@pytest.mark.slow
def test_shipped_modalities_config_runs_in_one_process(smollm2_dir, tmp_path):
    command = [sys.executable, "-m", "lorafit", "run", "--config_file_path", str(SHIPPED.relative_to(REPO)),
               "--experiment_id", "m1", *SIZE, *_paths(tmp_path)]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_run(tmp_path / "ckpt" / "m1", world=1)
    assert list((tmp_path / "wandb").glob("wandb/offline-run-*"))  # the W&B run, offline, under `directory`


@pytest.mark.slow
def test_verbatim_shared_config_under_torchrun_two_processes(smollm2_dir, tmp_path):
    text = VERBATIM.read_text()
    for old, new in [
        ("/raid/s3/opengptx/alignment_data/data/honey/data/en/ultrachat_200k_fastchat_39721ee/"
         "ultrachat_200k_fastchat_converted_", "data/modalities/chat_"),
        (".39721ee.pbin", ".pbin"),
        ("HuggingFaceTB/SmolLM-1.7B", "data/models/SmolLM2-135M"),
        ("/raid/s3/opengptx/alexj/llm_gym/models/SmolLM-1.7B_saved/model.bin",
         "data/models/SmolLM2-135M_saved/model.bin"),
    ]:  # fmt: skip
        assert old in text
        text = text.replace(old, new)
    config = tmp_path / "config_lorem_ipsum_lora.yaml"
    config.write_text(text)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", "src/lorafit/__main__.py", "run",
               "--config_file_path", str(config), "--experiment_id", "m2", *SIZE, *_paths(tmp_path)]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fsdp2" in proc.stdout and "on 2 process(es)" in proc.stdout
    _check_run(tmp_path / "ckpt" / "m2", world=2)
