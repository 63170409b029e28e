"""`lorafit run` end to end on a tiny Llama: the run folder, exact resume, and the refusals that protect a run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_run import lorafit
from lorafit.cli import main
from tiny_runs import adapter_tensors, losses, tiny_config


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(config_path: Path, root: Path, experiment_id: str, *extra: str) -> int:
    """`lorafit run` in-process; returns its exit code."""
    args = ["--config_file_path", str(config_path), "--experiments_root_path", str(root), "--experiment_id"]
    return main(["run", *args, experiment_id, *extra])


@pytest.fixture
def cfg(tmp_path, tiny_model_dir):
    return lambda **kw: write(
        tmp_path / f"c{len(kw)}{hash(frozenset(kw.items())) & 0xFFFF}.yaml", tiny_config(tiny_model_dir, tmp_path, **kw)
    )


def test_run_writes_the_run_folder_and_a_peft_adapter(tmp_path, cfg, tiny_model_dir):
    config_path = cfg()
    root = tmp_path / "exp"
    assert run(config_path, root, "straight") == 0
    run_dir = root / "straight"
    assert (run_dir / "config.yaml").read_bytes() == config_path.read_bytes()
    resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    assert resolved["model"]["config"]["r"] == 4
    steps = losses(run_dir)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert steps[6] < steps[1]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_000004", "step_000006"]  # keep_last 2
    assert (run_dir / "loss.png").stat().st_size > 1000

    # the adapter loads in peft and computes what our LoRA model computes
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorafit

    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter"
    ).eval()
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lorafit.load_adapter(ours, run_dir / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours.eval()(ids).logits, atol=1e-5, rtol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert not torch.allclose(plain, ours(ids).logits)  # training changed something


def test_killed_run_resumes_exactly(tmp_path, cfg):
    """SIGKILL a run once its step-3 checkpoint exists, resume it: same losses and bitwise-same adapter as a run
    that was never interrupted (one process on CPU is deterministic)."""
    import os
    import signal
    import time

    config_path = cfg(steps=12, checkpoint_every=1)
    root = tmp_path / "exp"
    assert run(config_path, root, "straight") == 0

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorafit",
            "run",
            "--config_file_path",
            str(config_path),
            "--experiments_root_path",
            str(root),
            "--experiment_id",
            "killed",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = root / "killed" / "checkpoints"

    def past_step_3() -> bool:  # any complete checkpoint from step 3 on: the run keeps only the last 2 of them,
        # and tiny steps are fast enough on a quiet machine that step_000003 alone can come and go between polls
        return any(
            p.name.removeprefix("step_").isdigit() and int(p.name.removeprefix("step_")) >= 3
            for p in checkpoints.glob("step_*")
        )

    deadline = time.time() + 300
    while not past_step_3() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert past_step_3(), "the run ended before its step-3 checkpoint"
    assert not (root / "killed" / "adapter").exists(), "killed too late to test anything"

    assert run(config_path, root, "killed", "--resume_from", "latest") == 0
    assert losses(root / "straight") == losses(root / "killed")
    a, b = adapter_tensors(root / "straight"), adapter_tensors(root / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


def test_resume_with_longer_target_needs_explicit_override(tmp_path, cfg, capsys):
    root = tmp_path / "exp"
    assert run(cfg(steps=2), root, "short") == 0
    capsys.readouterr()
    longer = cfg(steps=4)
    assert run(longer, root, "short", "--resume_from", "latest") == 2
    assert "settings.training_target.num_target_steps: 2 -> 4" in capsys.readouterr().err
    assert run(longer, root, "short", "--resume_from", "latest", "--allow_config_change") == 0
    assert max(losses(root / "short")) == 4


def test_resume_with_changed_lora_shape_is_refused(tmp_path, cfg, capsys):
    root = tmp_path / "exp"
    assert run(cfg(steps=2), root, "r4") == 0
    capsys.readouterr()
    code = run(cfg(steps=4, r=8), root, "r4", "--resume_from", "latest")
    err = capsys.readouterr().err
    assert code == 2
    assert "refusing to resume" in err and "model.config.r: 4 -> 8" in err and "--allow_config_change" in err


def test_existing_run_folder_is_never_overwritten(tmp_path, cfg, capsys):
    root = tmp_path / "exp"
    (root / "taken").mkdir(parents=True)
    (root / "taken" / "notes.txt").write_text("mine")
    code = run(cfg(steps=1), root, "taken")
    assert code == 2
    assert "run folder already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "taken").iterdir()) == ["notes.txt"]
    assert (root / "taken" / "notes.txt").read_text() == "mine"


def test_validate_reports_every_problem_at_once_without_traceback(tmp_path, tiny_model_dir):
    config = tiny_config(tiny_model_dir, tmp_path)
    config["model"]["config"]["r"] = 0
    config["optimizer"]["variant_key"] = "adamww"
    config["train_dataset"]["config"]["tokenizer"]["instance_key"] = "tokeniser"
    config["settings"]["step_profile"]["sequence_length"] = "long"
    path = write(tmp_path / "broken.yaml", config)
    proc = lorafit("validate", "--config_file_path", str(path))
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err
    for fragment in [
        "model.config.r",
        "optimizer.variant_key",
        "did you mean 'adamw'",
        "train_dataset.config.tokenizer.instance_key",
        "missing instance 'tokeniser'",
        "settings.step_profile.sequence_length",
    ]:
        assert fragment in err, fragment


def test_validate_prints_matched_modules_on_meta(tmp_path, cfg):
    proc = lorafit("validate", "--config_file_path", str(cfg()))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "config OK" in out and "q_proj" in out and "v_proj" in out and "trainable params:" in out


def test_a_run_that_fails_while_building_leaves_no_run_folder(tmp_path, tiny_model_dir, capsys):
    root = tmp_path / "exp"
    config = tiny_config(tiny_model_dir, tmp_path, steps=1)
    config["base_model"]["config"]["model_name_or_path"] = str(tmp_path / "no_such_model")
    assert run(write(tmp_path / "bad.yaml", config), root, "retry") == 2
    assert "base_model.config.model_name_or_path" in capsys.readouterr().err
    assert not (root / "retry").exists()  # so the same experiment id works once the config is fixed
    assert run(write(tmp_path / "good.yaml", tiny_config(tiny_model_dir, tmp_path, steps=1)), root, "retry") == 0


def test_frozen_weights_in_bf16_train_close_to_fp32(tmp_path, tiny_model_dir, capsys):
    """`frozen_dtype: bfloat16` from YAML: the run trains, its loss curve stays within 2% of the fp32 run's (the base
    is only rounded to bf16) and the adapter is an ordinary fp32 PEFT adapter."""
    config = tiny_config(tiny_model_dir, tmp_path, steps=4, checkpoint_every=4)
    root = tmp_path / "exp"
    assert run(write(tmp_path / "fp32.yaml", config), root, "fp32") == 0
    config["model"]["config"]["frozen_dtype"] = "bfloat16"
    assert run(write(tmp_path / "bf16.yaml", config), root, "bf16") == 0
    assert "stored in bfloat16, computed in fp32" in capsys.readouterr().out
    fp32, bf16 = losses(root / "fp32"), losses(root / "bf16")
    assert fp32.keys() == bf16.keys() and fp32 != bf16
    assert all(abs(bf16[s] - fp32[s]) <= 0.02 * fp32[s] for s in fp32)
    import torch

    assert {t.dtype for t in adapter_tensors(root / "bf16").values()} == {torch.float32}
