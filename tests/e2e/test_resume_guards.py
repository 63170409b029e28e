"""Resume through the real CLI (subprocesses, torchrun for the world-size cases): what may continue a run, what is
refused, and that a resume never writes into another run's folder.

One finished 4-step run (checkpoints at steps 2 and 4) is the source of every case; each case resumes from its
step-2 checkpoint, so the steps after it can be compared with the source run's.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from cli_run import REPO, lorafit_run, metrics
from tiny_runs import LOREM, tiny_run_config


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256 (and every folder name): equal digests = byte-identical trees."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def adapter(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dir):
    """A finished 4-step run `src` (1 process, micro 2 x accumulation 2) and a writer for changed configs."""
    tmp = tmp_path_factory.mktemp("resume_guards")
    data = tmp / "train.txt"
    shutil.copy(LOREM, data)
    root = tmp / "exp"

    def write(name: str, **changes) -> Path:
        path = tmp / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                tiny_run_config(tiny_model_dir, data=data, cache_path=tmp / "lorem", **changes), sort_keys=False
            )
        )
        return path

    proc = lorafit_run(write("base"), root, "--experiment_id", "src")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "run": root / "src", "write": write, "data": data}


def test_new_experiment_id_from_another_runs_checkpoint_makes_a_new_run(source):
    before = tree_digest(source["run"])
    step2 = source["run"] / "checkpoints" / "step_000002"
    proc = lorafit_run(source["write"]("base"), source["root"], "--experiment_id", "fork", "--resume_from", str(step2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert tree_digest(source["run"]) == before  # the source run: byte-identical, its step-4 checkpoint in place
    fork = source["root"] / "fork"
    assert sorted(metrics(fork)) == [3, 4]
    original = metrics(source["run"])
    assert [metrics(fork)[s]["loss"] for s in (3, 4)] == [original[s]["loss"] for s in (3, 4)]  # 1 process: bitwise
    a, b = adapter(source["run"]), adapter(fork)
    assert all(a[k].equal(b[k]) for k in a)
    assert (fork / "report.md").is_file() and (fork / "config.yaml").is_file()


def test_allowed_lr_change_is_applied_and_a_refused_one_names_it(source):
    step2 = str(source["run"] / "checkpoints" / "step_000002")
    changed = source["write"]("lr10", lr=3e-2)
    refused = lorafit_run(changed, source["root"], "--experiment_id", "lr_refused", "--resume_from", step2)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "optimizer.config.lr: 0.003 -> 0.03" in refused.stderr and "--allow_config_change" in refused.stderr
    assert not (source["root"] / "lr_refused").exists()

    before = tree_digest(source["run"])
    proc = lorafit_run(
        changed, source["root"], "--experiment_id", "lr10", "--resume_from", step2, "--allow_config_change"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "optimizer.config.lr: 0.003 -> 0.03" in proc.stdout
    assert tree_digest(source["run"]) == before
    original, resumed = metrics(source["run"]), metrics(source["root"] / "lr10")
    for step in (3, 4):  # the same point of the same schedule, at 10x the peak lr
        assert resumed[step]["lr"] == pytest.approx(10 * original[step]["lr"], rel=1e-12)
    assert resumed[3]["loss"] == original[3]["loss"]  # step 3's loss is computed before the new lr acts
    a, b = adapter(source["run"]), adapter(source["root"] / "lr10")
    assert any(not a[k].equal(b[k]) for k in a)


def test_changed_global_batch_is_refused_and_a_kept_one_resumes_the_data_order(source):
    step2 = str(source["run"] / "checkpoints" / "step_000002")
    # 2 processes x micro 2 x accumulation 2 = 8 samples per step, the checkpoint's run had 4
    refused = lorafit_run(
        source["write"]("base"), source["root"], "--experiment_id", "two_procs", "--resume_from", step2, processes=2
    )
    # torchrun exits 1 when a worker fails; the workers themselves exited with lorafit's user-error code 2
    assert refused.returncode == 1 and "exitcode  : 2" in refused.stderr, refused.stdout[-3000:] + refused.stderr
    err = refused.stderr
    assert "global batch (samples per step): 4 -> 8" in err, err
    assert "gradient_accumulation_steps: 1 keeps it on 2 process(es)" in err and "--allow_config_change" in err
    assert 'File "' + str(REPO / "src") not in err and not (source["root"] / "two_procs").exists()  # no lorafit frame

    # accumulation halved: the same 4 samples per step, so the same samples in the same steps
    kept = lorafit_run(
        source["write"]("accum1", accum=1),
        source["root"],
        "--experiment_id",
        "two_kept",
        "--resume_from",
        step2,
        processes=2,
    )
    assert kept.returncode == 0, kept.stdout[-3000:] + kept.stderr[-3000:]
    original, resumed = metrics(source["run"]), metrics(source["root"] / "two_kept")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["tokens"] == original[step]["tokens"]
        assert resumed[step]["loss"] == pytest.approx(original[step]["loss"], abs=1e-5, rel=0)


def test_training_file_edited_before_resume_is_refused(source, tmp_path):
    copy = tmp_path / "exp"
    shutil.copytree(source["root"] / "src", copy / "src")
    text = source["data"].read_text()
    edited = text.replace("Lorem", "Dolor", 1)  # same length, same number of samples, other tokens
    assert edited != text and len(edited) == len(text)
    source["data"].write_text(edited)
    try:
        proc = lorafit_run(source["write"]("base"), copy, "--experiment_id", "src", "--resume_from", "latest")
    finally:
        source["data"].write_text(text)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train_dataset.config.path: the file changed since the checkpoint" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
