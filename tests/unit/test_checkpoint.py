"""Checkpoints: adapter + optimizer only (no base weights), atomic, pruned, checked on load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _env():
    from lorafit.distributed.env import init_distributed

    return init_distributed()


def _trained(hidden: int = 32):
    """Tiny Llama with LoRA and an optimizer that has taken one step (so its state exists)."""
    from lorafit.lora import apply_lora
    from lorafit.training.optim import AdamWConfig, OptimizerFactory
    from tiny import make_llama

    model = apply_lora(
        make_llama(hidden_size=hidden, intermediate_size=2 * hidden),
        r=4,
        alpha=8,
        target_layers=["q_proj", "v_proj"],
        seed=0,
    )
    optimizer = OptimizerFactory(AdamWConfig(lr=1e-2))(model)
    model(torch.randint(0, 384, (2, 8))).logits.square().mean().backward()
    optimizer.step()
    return model, optimizer


def _save(run_dir, step, model, optimizer, keep_last=5):
    from lorafit.checkpoint.state import save_checkpoint

    state = {"tokens": step * 10, "sampler": {"epoch": 0, "consumed": step}, "scheduler": {}, "elapsed_s": 1.0}
    return save_checkpoint(run_dir, step, model, optimizer, state, _env(), keep_last)


def test_checkpoint_holds_adapter_and_optimizer_but_no_base_weights(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from lorafit.checkpoint.state import checkpoint_bytes
    from lorafit.lora import lora_parameters

    model, optimizer = _trained(hidden=128)
    path = _save(tmp_path, 1, model, optimizer)
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert len(model_keys) == len(lora_parameters(model))

    adapter_bytes = sum(p.numel() * p.element_size() for p in lora_parameters(model))
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    data_bytes = sum(p.stat().st_size for p in path.glob("*.distcp"))
    # adapter + AdamW's two moments; DCP adds ~1.3 kB per entry (each is a small torch.save record)
    overhead = 1536 * len(keys)
    assert 3 * adapter_bytes <= data_bytes < 3 * adapter_bytes + overhead
    # plus .metadata, RNG states and counters (~30 kB); the frozen base is absent
    assert checkpoint_bytes(path) < 3 * adapter_bytes + overhead + 32 * 1024 < base_bytes / 4


def test_keeps_the_newest_k(tmp_path):
    from lorafit.checkpoint.state import list_checkpoints

    model, optimizer = _trained()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, optimizer, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_damaged_or_incomplete_latest_falls_back_to_previous(tmp_path, capsys):
    from lorafit.checkpoint.resume import resolve_checkpoint
    from lorafit.checkpoint.state import find_latest, verify_checkpoint
    from lorafit.errors import UserError

    model, optimizer = _trained()
    good, damaged, cut = (_save(tmp_path, s, model, optimizer) for s in (2, 4, 6))
    data = next(damaged.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    (cut / "COMPLETE").unlink()

    assert "incomplete" in verify_checkpoint(cut)
    assert "checksum" in verify_checkpoint(damaged)
    assert verify_checkpoint(good) is None
    assert find_latest(tmp_path) == good
    err = capsys.readouterr().err
    assert "step_000006" in err and "step_000004" in err and "previous" in err
    assert resolve_checkpoint(tmp_path, "latest") == good
    with pytest.raises(UserError, match="checksum"):
        resolve_checkpoint(tmp_path, damaged)


def test_load_restores_adapter_and_optimizer(tmp_path):
    from lorafit.checkpoint.state import load_checkpoint
    from lorafit.lora import named_lora_parameters

    model, optimizer = _trained()
    path = _save(tmp_path, 3, model, optimizer)
    fresh, fresh_opt = _trained()
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    state = load_checkpoint(path, fresh, fresh_opt, _env())
    assert state["step"] == 3 and state["sampler"] == {"epoch": 0, "consumed": 3} and state["rng"] is not None
    expected = dict(named_lora_parameters(model))
    for name, p in named_lora_parameters(fresh):
        assert torch.equal(p, expected[name]), name
    got, want = fresh_opt.state_dict()["state"], optimizer.state_dict()["state"]
    assert got.keys() == want.keys()
    assert all(torch.equal(got[i]["exp_avg_sq"], want[i]["exp_avg_sq"]) for i in want)


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    import lorafit.checkpoint.state as cs
    from lorafit.distributed.env import init_distributed

    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    env = init_distributed()
    state = {"tokens": 0, "sampler": {}, "scheduler": {}}
    cs.save_checkpoint(sys.argv[1], 1, model, optimizer, state, env)

    def stall(path):  # every data file of step 2 is written; the marker is not
        print("WRITING", flush=True)
        time.sleep(120)

    cs.file_sha256 = stall
    cs.save_checkpoint(sys.argv[1], 2, model, optimizer, state, env)
    """
)


@pytest.mark.integration  # a killed subprocess
def test_sigkill_while_writing_leaves_previous_checkpoints_intact(tmp_path):
    from lorafit.checkpoint.state import find_latest, verify_checkpoint

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "WRITING"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "step_000002.tmp").is_dir() and not (checkpoints / "step_000002").exists()
    assert any((checkpoints / "step_000002.tmp").glob("*.distcp"))
    assert verify_checkpoint(checkpoints / "step_000001") is None
    assert find_latest(tmp_path) == checkpoints / "step_000001"

    model, optimizer = _trained()  # the next save replaces the stale .tmp folder
    _save(tmp_path, 2, model, optimizer)
    assert not (checkpoints / "step_000002.tmp").exists() and find_latest(tmp_path) == checkpoints / "step_000002"


def test_resuming_from_an_earlier_checkpoint_sets_later_ones_aside(tmp_path):
    from lorafit.checkpoint.resume import supersede_after
    from lorafit.checkpoint.state import find_latest, list_checkpoints

    model, optimizer = _trained()
    for step in (2, 4, 6):
        _save(tmp_path, step, model, optimizer)
    moved = supersede_after(tmp_path, 2)  # the run continues from step 2: 4 and 6 are a discarded future
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2] and find_latest(tmp_path).name == "step_000002"
    assert sorted(p.name.split(".")[0] for p in moved) == ["step_000004", "step_000006"]
    assert all(p.is_dir() and (p / "COMPLETE").is_file() for p in moved)  # kept for the user, not deleted
