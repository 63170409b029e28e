"""`lorafit export modalities` as a user runs it on a tiny run: the same file from the final adapter, from the
latest checkpoint of a run that has no adapter/ (stopped before its end) and from a named checkpoint; and the
refusals, each one line with exit code 2 that leaves what exists as it was. (That Modalities loads the files:
tests/e2e/test_modalities_way_back.py, the `modalities` tier.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lorafit.cli import main

NAME = "eid_tiny-model-num_steps_4-num_tokens_512.bin"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    import lorafit
    from tiny_runs import tiny_run_config

    tmp = tmp_path_factory.mktemp("export_modalities")
    config = tiny_run_config(tiny_model_dir, cache_path=tmp / "cache", steps=4)  # checkpoints at steps 2 and 4
    return lorafit.train(config, experiments_root_path=tmp / "runs", experiment_id="tiny")


def export(run: Path, output: Path, *extra: str) -> int:
    return main(["export", "modalities", "--run", str(run), "--output", str(output), *extra])


def test_the_adapter_the_latest_checkpoint_and_a_named_checkpoint_give_the_same_file(
    run_dir, tmp_path, capsys, tiny_model_dir
):
    assert export(run_dir, tmp_path / "adapter", "--form", "lora") == 0
    out = capsys.readouterr().out
    assert "variant_key: lora" in out and "    r: 4\n" in out and "    alpha: 8\n" in out
    # the base named with --model instead of rebuilt from the run's config
    assert export(run_dir / "adapter", tmp_path / "base", "--form", "lora", "--model", str(tiny_model_dir)) == 0
    stopped = tmp_path / "runs" / "tiny"  # the same run as if it had stopped before writing adapter/
    shutil.copytree(run_dir, stopped, ignore=shutil.ignore_patterns("adapter"))
    assert export(stopped, tmp_path / "latest", "--form", "lora") == 0
    assert export(run_dir / "checkpoints" / "step_000004", tmp_path / "named", "--form", "lora") == 0
    files = [tmp_path / folder / NAME for folder in ("adapter", "base", "latest", "named")]
    states = [torch.load(f, weights_only=True) for f in files]
    assert "huggingface_model.model.layers.1.self_attn.v_proj.lora_B" in states[0]
    for state in states[1:]:
        assert state.keys() == states[0].keys() and all(torch.equal(state[k], states[0][k]) for k in state)
    # an earlier checkpoint: other adapters, named for its step
    assert export(run_dir / "checkpoints" / "step_000002", tmp_path / "early", "--form", "lora") == 0
    (early,) = (tmp_path / "early").iterdir()
    assert early.name.startswith("eid_tiny-model-num_steps_2-")


def test_refusals_say_what_is_wrong_and_leave_everything_as_it_was(run_dir, tmp_path, capsys):
    assert export(run_dir, tmp_path / "out") == 0  # merged, the default
    written = (tmp_path / "out" / NAME).read_bytes()
    capsys.readouterr()
    cases = [
        ((run_dir, tmp_path / "out"), f"--output: {tmp_path / 'out' / NAME} exists; lorafit never replaces"),
        ((tmp_path / "nowhere", tmp_path / "o2"), "--run: " + str(tmp_path / "nowhere") + " does not exist"),
        ((tmp_path, tmp_path / "o3"), "is not a lorafit run folder (no config.resolved.yaml)"),
        ((run_dir, run_dir / "config.yaml"), "is a file, not a folder"),
    ]
    for (run, output), said in cases:
        assert export(run, output) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    assert (tmp_path / "out" / NAME).read_bytes() == written
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
