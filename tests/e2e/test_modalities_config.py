"""Modalities' LoRA configs train in lorafit, each in one process (`lorafit run`) and under the seed's torchrun
command with 2 processes: the shipped copy, the verbatim shared file (paths changed as a user would), and the
lora_2 branch's config with the other component set. Sizes are shrunk only on the command line. Checkpoints land
where Modalities puts them (checkpoint_path/<experiment_id>/), keeping the k most recent; the step count and the
global batch are the ones Modalities' rules give, computed here from the data."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from cli_run import lorafit_command
from lorafit.data.pbin import read_pbin

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "modalities" / "config_lorem_ipsum_lora.yaml"
FIXTURES = REPO / "tests" / "fixtures" / "modalities"  # verbatim Modalities configs
SEQ = 128  # the mask collator needs both markers in every micro-batch (Modalities raises otherwise)

# Paths a user changes (the authors' cluster -> the shipped data and the embedded SmolLM2)
LORA_PATHS = [
    (
        "/raid/s3/opengptx/alignment_data/data/honey/data/en/ultrachat_200k_fastchat_39721ee/"
        "ultrachat_200k_fastchat_converted_",
        "data/modalities/chat_",
    ),
    (".39721ee.pbin", ".pbin"),
    ("HuggingFaceTB/SmolLM-1.7B", "data/models/SmolLM2-135M"),
    ("/raid/s3/opengptx/alexj/llm_gym/models/SmolLM-1.7B_saved/model.bin", "data/models/SmolLM2-135M_saved/model.bin"),
]
LORA2_PATHS = [
    (
        "/raid/s3/opengptx/maxr/ogptx/modalities/data/fineweb/fineweb_edu_data/fineweb-edu-CC-MAIN_test.pbin",
        "data/modalities/chat_train.pbin",
    ),
    ("openGPT-X/Teuken-7B-sigma-instruct-commercial-v0.6", "data/models/SmolLM2-135M"),
]


def _lora_branch(tmp: Path, world: int) -> tuple[list[str], dict]:
    """settings.training: micro 1 x accumulation 2, 4 micro-batches per rank -> 2 steps; checkpoint every step,
    keep the most recent (k=1); one eval batch per loader."""
    overrides = [
        f"settings.training.sequence_length={SEQ}",
        "settings.training.local_train_micro_batch_size=1",
        "settings.training.gradient_acc_steps=2",
        "train_dataloader.config.fixed_num_batches=4",
        "val_dataloader.config.fixed_num_batches=1",
        "test_dataloader.config.fixed_num_batches=1",
        "settings.training.checkpointing_interval_in_steps=1",
        "checkpoint_saving.config.checkpoint_saving_strategy.config.k=1",
        f"settings.paths.checkpointing_path={tmp / 'ckpt'}",
        "evaluation_subscriber.config.mode=OFFLINE",
        f"evaluation_subscriber.config.directory={tmp / 'wandb'}",
    ]
    # Modalities' lora branch: one pass; per rank floor(N / W) samples, floor(/ micro) batches (capped), // acc
    n = len(read_pbin(REPO / "data/modalities/chat_train.pbin").tokens) // (SEQ + 1)  # reuse_last_target: false
    steps = min(n // world // 1, 4) // 2
    return overrides, {"steps": steps, "global_batch": 1 * 2 * world, "kept": [steps], "log_every": 2}


def _lora2_branch(tmp: Path, world: int) -> tuple[list[str], dict]:
    """settings.step_profile + training_target (number_conversion from the .pbin): overridden to 2 steps of micro 1
    x accumulation 1 per rank (tokens consistent, as Modalities enforces); checkpoint every step, keep all (k=-1).
    Its model is Teuken (Modalities' GPT-2 layer names q_attn...): with SmolLM2 the targets get Llama's names."""
    tokens = 2 * 1 * SEQ * 1 * world
    overrides = [
        f"settings.step_profile.sequence_length={SEQ}",
        "settings.training_target.num_target_steps=2",
        f"settings.training_target.num_target_tokens={tokens}",
        "settings.intervals.checkpointing_interval_in_steps=1",
        "settings.intervals.evaluation_interval_in_steps=2",
        "val_dataloader.config.fixed_num_batches=1",
        "test_dataloader.config.fixed_num_batches=1",
        "lora_model.config.target_layers=[q_proj,k_proj,v_proj,o_proj]",
        f"settings.paths.checkpoint_saving_path={tmp / 'ckpt'}",
        f"evaluation_subscriber.config.directory={tmp / 'wandb'}",
    ]
    return overrides, {"steps": 2, "global_batch": 1 * 1 * world, "kept": [1, 2], "log_every": 1}


def _config(name: str, tmp: Path) -> tuple[Path, list[tuple[str, str]]]:
    if name == "shipped":
        return SHIPPED.relative_to(REPO), []
    source, paths = {
        "verbatim": ("config_lorem_ipsum_lora.yaml", LORA_PATHS),
        "lora_2": ("config_lorem_ipsum_lora_training.yaml", LORA2_PATHS),
    }[name]
    text = (FIXTURES / source).read_text()
    for old, new in paths:
        assert old in text
        text = text.replace(old, new)
    path = tmp / source
    path.write_text(text)
    return path, paths


def _run(name: str, world: int, tmp: Path) -> tuple[Path, dict, str]:
    config, _ = _config(name, tmp)
    overrides, expect = (_lora2_branch if name == "lora_2" else _lora_branch)(tmp, world)
    args = ["run", "--config_file_path", str(config), "--experiment_id", f"{name}{world}", *overrides]
    command = lorafit_command(*args, processes=world)  # more than one: the seed's torchrun command
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "ckpt" / f"{name}{world}", expect, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "world"),
    [("shipped", 1), ("shipped", 2), ("verbatim", 1), ("verbatim", 2), ("lora_2", 1), ("lora_2", 2)],
)
def test_modalities_lora_config_trains(smollm2_dir, tmp_path, name, world):
    run_dir, expect, stdout = _run(name, world, tmp_path)
    assert f"on {world} process(es)" in stdout and (world == 1 or "fsdp2" in stdout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps, batch = expect["steps"], expect["global_batch"]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(expect["log_every"], steps + 1, expect["log_every"]))
    assert logged[-1]["tokens"] == steps * batch * SEQ  # global batch = micro x accumulation x world size
    assert any("eval/val/loss" in r for r in rows) and any("eval/test/loss" in r for r in rows)
    # checkpoint_path/<experiment_id>/: a checkpoint every step, the k most recent kept
    kept = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == expect["kept"]
    assert all((run_dir / "checkpoints" / f"step_{s:06d}" / "COMPLETE").is_file() for s in kept)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    resolved = (run_dir / "config.resolved.yaml").read_text()
    assert "# command-line override: " in resolved
    if name != "lora_2":
        assert yaml.safe_load(resolved)["settings"]["training"]["sequence_length"] == SEQ
    assert list((tmp_path / "wandb").glob("wandb/offline-run-*"))  # the W&B run, offline, under `directory`


def test_shipped_config_is_the_verbatim_one_with_paths_changed(tmp_path):
    """Only paths (and the header comment) differ: what the shipped file shows is what Modalities ships."""
    verbatim = yaml.safe_load(_config("verbatim", tmp_path)[0].read_text())
    shipped = yaml.safe_load(SHIPPED.read_text())
    assert shipped["settings"]["paths"].pop("checkpointing_path") != verbatim["settings"]["paths"].pop(
        "checkpointing_path"
    )
    assert shipped == verbatim
