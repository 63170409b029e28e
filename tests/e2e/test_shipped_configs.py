"""Every YAML under configs/ is checked, and the seed's lorem-ipsum config runs under torchrun with 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import free_port

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"config_lorem_ipsum_lora.yaml", "smollm2_135m_lora.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(config, smollm2_dir, monkeypatch):
    from lorafit.build import validate_config

    monkeypatch.chdir(REPO)  # configs use paths relative to the repository root
    report = validate_config(config.relative_to(REPO))
    assert "config OK" in report and "trainable params:" in report


@pytest.mark.slow
def test_lorem_ipsum_config_under_torchrun_two_processes(smollm2_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", "src/lorafit/__main__.py", "run",
               "--config_file_path", "configs/config_lorem_ipsum_lora.yaml",
               "--experiments_root_path", str(tmp_path), "--experiment_id", "lorem2"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
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
