"""Every YAML under configs/ is checked, and the seed's lorem-ipsum config runs under torchrun with 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cli_run import lorafit_command

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


GALLERY = ("chat_sft", "text_continuation", "qlora", "multi_process")  # the starting configs `lorafit configs cp` gives


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"config_lorem_ipsum_lora.yaml", "smollm2_135m_lora.yaml", *(f"{g}.yaml" for g in GALLERY)} <= names


def _on_tiny(tiny_model_dir, *more: str) -> list[str]:
    """Overrides that put a starting config on the tiny model (its context is 256 positions), for `steps` steps."""
    return [f"settings.paths.model_folder={tiny_model_dir}", "settings.step_profile.sequence_length=128", *more]


@pytest.mark.parametrize("name", GALLERY)
def test_starting_config_validates_and_trains_on_the_tiny_model(name, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Each starting config as a user gets it (copied out), with only its model swapped: validate, then 2 steps."""
    from lorafit.cli import main

    monkeypatch.chdir(REPO)  # its data paths are relative to the repository root
    copy = tmp_path / "mine.yaml"
    assert main(["configs", "cp", name, str(copy)]) == 0
    assert copy.read_bytes() == (REPO / "configs" / f"{name}.yaml").read_bytes()
    assert main(["validate", "--config", str(copy), *_on_tiny(tiny_model_dir)]) == 0
    assert "num_target_epochs" in capsys.readouterr().out  # the gallery speaks epochs
    if name == "multi_process":
        return  # trained under torchrun below
    steps = "settings.training_target={num_target_steps: 2}"
    run = ["run", "--config", str(copy), "--experiments_root_path", str(tmp_path / "exp"), "--experiment_id", "x"]
    assert main([*run, *_on_tiny(tiny_model_dir, steps)]) == 0
    assert (tmp_path / "exp" / "x" / "adapter" / "adapter_model.safetensors").is_file()


def test_multi_process_starting_config_under_torchrun(tiny_model_dir, tmp_path):
    steps = "settings.training_target={num_target_steps: 2}"
    overrides = _on_tiny(tiny_model_dir, steps, "parallelism.config.mixed_precision=fp32")
    root = ["--experiments_root_path", str(tmp_path), "--experiment_id", "mp"]
    command = lorafit_command("run", "--config", "configs/multi_process.yaml", *root, *overrides, processes=2)
    proc = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fsdp2" in proc.stdout and "on 2 process(es)" in proc.stdout
    assert (tmp_path / "mp" / "adapter" / "adapter_model.safetensors").is_file()


def test_evaluators_under_torchrun_finish(tiny_model_dir, tmp_path):
    """Rank 0 alone evaluates (on a whole model) while the other ranks wait at a barrier: generation must not
    wait for them at every step. It did (generate's synced mode, switched on by the process group), and a
    2-process run with an evaluator hung before training."""
    held = tmp_path / "held.jsonl"
    held.write_text("".join((REPO / "data" / "task" / "test.jsonl").read_text().splitlines(keepends=True)[:3]))
    config = tmp_path / "mp.yaml"
    config.write_text(
        (REPO / "configs" / "multi_process.yaml").read_text()
        + "\nevaluators:\n  - component_key: evaluator\n    variant_key: exact_match\n"
        + f"    config: {{path: {held}, max_new_tokens: 4}}\n"
    )
    steps = "settings.training_target={num_target_steps: 2}"
    overrides = _on_tiny(tiny_model_dir, steps, "parallelism.config.mixed_precision=fp32")
    root = ["--experiments_root_path", str(tmp_path), "--experiment_id", "ev"]
    command = lorafit_command("run", "--config", str(config), *root, *overrides, processes=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[before training] heldout" in proc.stdout and "[after training] heldout" in proc.stdout
    assert json.loads((tmp_path / "ev" / "eval_after.json").read_text())["heldout"]["n"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(config, smollm2_dir, monkeypatch):
    from lorafit.run.build import validate_config

    monkeypatch.chdir(REPO)  # configs use paths relative to the repository root
    report = validate_config(config.relative_to(REPO))
    assert "config OK" in report and "trainable params:" in report


@pytest.mark.slow
def test_lorem_ipsum_config_under_torchrun_two_processes(smollm2_dir, tmp_path):
    root = ["--experiments_root_path", str(tmp_path), "--experiment_id", "lorem2"]
    command = lorafit_command("run", "--config_file_path", "configs/config_lorem_ipsum_lora.yaml", *root, processes=2)
    proc = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "lorem2"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 9))
    assert all(r["tokens"] == 2 * 2 * 128 * r["step"] for r in rows if "loss" in r)  # 2 ranks x micro 2 x 128
    assert "fsdp2" in proc.stdout and "on 2 process(es)" in proc.stdout

    from safetensors.torch import load_file

    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 30 * 4 * 2  # 30 layers x q,k,v,o x (A, B): the whole adapter, gathered from both ranks
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 1


def test_validate_leaves_a_cache_of_another_tokenizer_to_run(smollm2_dir, tiny_model_dir, tmp_path, monkeypatch):
    """The data's cache, tokenized for another model (SmolLM2's 49,152 tokens), is stale for the tiny model: `run`
    tokenizes it again, so `validate` must not read it as the data's pack index (it refused the config once: "packed
    with a tokenizer of 49,152 tokens, more than the model's 384 embedding rows")."""
    from lorafit.cli import main

    monkeypatch.chdir(REPO)
    copy = tmp_path / "mine.yaml"
    assert main(["configs", "cp", "chat_sft", str(copy)]) == 0
    root = ["--experiments_root_path", str(tmp_path / "exp")]
    one_step = ["settings.training_target={num_target_steps: 1}", "settings.step_profile.sequence_length=128"]
    big = [f"settings.paths.model_folder={smollm2_dir}", *one_step]
    assert main(["run", "--config", str(copy), *root, "--experiment_id", "big", *big]) == 0  # caches the data
    assert main(["validate", "--config", str(copy), *_on_tiny(tiny_model_dir)]) == 0
    steps = "settings.training_target={num_target_steps: 1}"
    assert main(["run", "--config", str(copy), *root, "--experiment_id", "tiny", *_on_tiny(tiny_model_dir, steps)]) == 0
