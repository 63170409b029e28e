"""A third hostile pass (issue 22): a shared checkpoint that would run code, a data tool pointed at its own
input, files in a run folder replaced by links, a stale JSONL index.

Through the real CLI, as tests/e2e/test_error_corpus_hostile.py: exit code 2, one `error:` line naming the file
or YAML key, no traceback, every user file byte-identical, and no payload ever runs.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_error_corpus_hostile import (
    assert_one_error,
    assert_unchanged,
    cli,
    lorafit_process,
    smallest_run_config,
    snapshot,
    write_yaml,
)

from cli_run import lorafit_command
from lorafit.checkpoint.state import COMPLETE, file_sha256
from tiny_runs import LOREM


# ------------------------------------------------------------------------- 1. a checkpoint that runs code
class _Payload:
    """Unpickling this runs `Path(marker).write_text('ran')`: the proof that pickled code was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def _poison(checkpoint: Path, marker: Path) -> None:
    """Replace the checkpoint's DCP `.metadata` with a pickle that runs code, and recompute COMPLETE's checksums
    so that only the content, not the integrity check, can give it away."""
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    record = json.loads((checkpoint / COMPLETE).read_text())
    record["files"] = {name: file_sha256(checkpoint / name) for name in record["files"]}
    (checkpoint / COMPLETE).write_text(json.dumps(record))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(config, experiments root) of a 2-step run with a checkpoint after each step (run `a`)."""
    root = tmp_path_factory.mktemp("shared")
    config = smallest_run_config(tiny_model_dir, LOREM, root / "cache" / "lorem", steps=2)
    config["settings"]["intervals"]["checkpointing_interval_in_steps"] = 1
    config["settings"]["checkpointing"] = {"keep_last": 3}
    path = write_yaml(root / "config.yaml", config)
    argv = [
        "run",
        "--config_file_path",
        str(path),
        "--experiments_root_path",
        str(root / "exp"),
        "--experiment_id",
        "a",
    ]
    from lorafit.cli import main

    assert main(argv) == 0
    return path, root / "exp"


@pytest.mark.parametrize("how", ["checkpoint", "run_folder", "latest"])
def test_a_checkpoint_whose_metadata_would_run_code_is_refused(how, finished_run, tmp_path, capsys):
    import shutil

    config, shared = finished_run
    root = tmp_path / "exp"
    shutil.copytree(shared / "a", root / "a")  # someone else's run folder, as shared or downloaded
    marker = tmp_path / "payload-ran"
    for checkpoint in (root / "a" / "checkpoints").iterdir():
        _poison(checkpoint, marker)
    before = snapshot(root / "a")
    resume_from = {
        "checkpoint": str(root / "a" / "checkpoints" / "step_000002"),
        "run_folder": str(root / "a"),
        "latest": "latest",
    }[how]
    experiment = "a" if how == "latest" else "b"
    argv = [
        "run",
        "--config_file_path",
        str(config),
        "--experiments_root_path",
        str(root),
        "--experiment_id",
        experiment,
        "--resume_from",
        resume_from,
    ]
    code, err = cli(argv, capsys)
    message = assert_one_error(code, err, ".metadata")
    assert not marker.exists(), "the pickled payload ran"
    assert "pathlib" in message or "refused" in message or "no complete checkpoint" in message, message
    for blamed in ("LoRA r", "target_layers", "config it was written with"):
        assert blamed not in message, message
    assert_unchanged(before, snapshot(root / "a"))
    assert not (root / "b").exists()


def _poison_a_value(checkpoint: Path, marker: Path) -> str:
    """Point one non-tensor value of the state dict (the optimizer's lr) at a torch.save'd payload appended to its
    .distcp file; .metadata stays DCP's own kind of file (it passes the allow-list), COMPLETE is recomputed."""
    import io

    import torch

    from lorafit.checkpoint.dcp_metadata import read_metadata

    metadata = read_metadata(checkpoint / ".metadata")
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    for index, item in metadata.storage_data.items():
        if index.fqn.endswith(".lr"):
            data_file = checkpoint / item.relative_path
            item.offset, item.length = data_file.stat().st_size, len(buffer.getvalue())
            with data_file.open("ab") as f:
                f.write(buffer.getvalue())
            break
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    record = json.loads((checkpoint / COMPLETE).read_text())
    record["files"] = {name: file_sha256(checkpoint / name) for name in record["files"]}
    (checkpoint / COMPLETE).write_text(json.dumps(record))
    return data_file.name


def test_a_checkpoint_value_that_would_run_code_is_refused(finished_run, tmp_path, capsys):
    """DCP reads the state dict's non-tensor values (lr, betas) with torch.load(weights_only=False): not here."""
    import shutil

    config, shared = finished_run
    root = tmp_path / "exp"
    shutil.copytree(shared / "a", root / "a")
    marker = tmp_path / "payload-ran"
    checkpoint = root / "a" / "checkpoints" / "step_000002"
    data_file = _poison_a_value(checkpoint, marker)
    argv = [
        "run",
        "--config_file_path",
        str(config),
        "--experiments_root_path",
        str(root),
        "--experiment_id",
        "b",
        "--resume_from",
        str(checkpoint),
    ]
    code, err = cli(argv, capsys)
    message = assert_one_error(code, err, data_file, "never loaded")
    assert not marker.exists(), "the pickled payload ran"
    assert "LoRA r" not in message and not (root / "b").exists()


def test_the_safe_planner_refuses_what_slips_past_the_check(finished_run, tmp_path):
    """The planner DCP loads with refuses the same value (a file swapped after the check is not trusted either)."""
    import shutil

    import torch

    from lorafit.checkpoint.dcp_metadata import SafeFileSystemReader, SafeLoadPlanner

    _, shared = finished_run
    checkpoint = tmp_path / "step"
    shutil.copytree(shared / "a" / "checkpoints" / "step_000002", checkpoint)
    marker = tmp_path / "payload-ran"
    _poison_a_value(checkpoint, marker)
    state = {"optim": {"param_groups": [{"lr": 0.0}]}}
    with pytest.raises(BaseException, match="not a plain value"):
        torch.distributed.checkpoint.load(
            state,
            storage_reader=SafeFileSystemReader(checkpoint),
            planner=SafeLoadPlanner(allow_partial_load=True),
            no_dist=True,
        )
    assert not marker.exists()


def test_the_safe_reader_reads_what_dcp_writes(finished_run):
    """The allow-list is not too narrow: DCP's own metadata (model + AdamW state) reads as DCP's Metadata."""
    from torch.distributed.checkpoint.metadata import Metadata

    from lorafit.checkpoint.dcp_metadata import read_metadata

    _, shared = finished_run
    for checkpoint in (shared / "a" / "checkpoints").iterdir():
        assert isinstance(read_metadata(checkpoint / ".metadata"), Metadata)


# ---------------------------------------------------------------- 2 and 4. pack_encoded_data and its inputs
def _prep_config(folder: Path, model_dir: Path, **settings) -> Path:
    config = {
        "settings": {
            "src_path": str(folder / "train.jsonl"),
            "dst_path": str(folder / "train.pbin"),
            "index_path": str(folder / "train.idx"),
            "jq_pattern": ".text",
            "num_cpus": 1,
            "eod_token": "<|endoftext|>",
            "processing_batch_size": 2,
            "raw_samples_queue_size": 4,
            "processed_samples_queue_size": 4,
            **settings,
        },
        "tokenizer": {
            "component_key": "tokenizer",
            "variant_key": "pretrained_hf_tokenizer",
            "config": {"pretrained_model_name_or_path": str(model_dir), "padding": False, "truncation": False},
        },
    }
    return write_yaml(folder / "prep.yaml", config)


def _jsonl(folder: Path, texts: list[str]) -> Path:
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize("key", ["src_path", "index_path"])
def test_pack_encoded_data_never_writes_over_its_own_input(key, tmp_path, tiny_model_dir, capsys):
    src = _jsonl(tmp_path, ["one document", "and another"])
    assert cli(["data", "create_raw_index", str(src)], capsys)[0] == 0
    input_file = {"src_path": src, "index_path": tmp_path / "train.idx"}[key]
    config = _prep_config(tmp_path, tiny_model_dir, dst_path=str(input_file))
    before = snapshot(tmp_path)
    code, err = cli(["data", "pack_encoded_data", str(config), "--overwrite"], capsys)
    assert_one_error(code, err, "settings.dst_path", f"is also settings.{key}")
    assert_unchanged(before, snapshot(tmp_path))


def test_pack_encoded_data_overwrite_replaces_only_a_pbin(tmp_path, tiny_model_dir, capsys):
    src = _jsonl(tmp_path, ["one document", "and another"])
    assert cli(["data", "create_raw_index", str(src)], capsys)[0] == 0
    (tmp_path / "notes.txt").write_text("my notes\n")
    config = _prep_config(tmp_path, tiny_model_dir, dst_path=str(tmp_path / "notes.txt"))
    before = snapshot(tmp_path)
    code, err = cli(["data", "pack_encoded_data", str(config), "--overwrite"], capsys)
    assert_one_error(code, err, "settings.dst_path", "is not a .pbin file")
    assert_unchanged(before, snapshot(tmp_path))
    # and a .pbin it wrote itself is replaced
    config = _prep_config(tmp_path, tiny_model_dir)
    assert cli(["data", "pack_encoded_data", str(config)], capsys)[0] == 0
    assert cli(["data", "pack_encoded_data", str(config), "--overwrite"], capsys)[0] == 0


@pytest.mark.parametrize("change", ["appended", "another_file"])
def test_a_stale_index_is_refused(change, tmp_path, tiny_model_dir, capsys):
    src = _jsonl(tmp_path, ["one document", "and another"])
    assert cli(["data", "create_raw_index", str(src)], capsys)[0] == 0
    if change == "appended":
        with src.open("a") as f:
            f.write(json.dumps({"text": "a line added after the index was made"}) + "\n")
    else:
        _jsonl(tmp_path, ["a different first line, longer", "x"])
    config = _prep_config(tmp_path, tiny_model_dir)
    before = snapshot(tmp_path)
    code, err = cli(["data", "pack_encoded_data", str(config)], capsys)
    assert_one_error(code, err, "settings.index_path", "does not match", "create_raw_index")
    assert_unchanged(before, snapshot(tmp_path))


def test_an_index_that_skips_faulty_lines_still_packs(tmp_path, tiny_model_dir, capsys):
    """Modalities' create_raw_index may drop lines that are not JSON (drop_faulty_entries): that index matches."""
    src = tmp_path / "train.jsonl"
    src.write_text('{"text": "one"}\nnot json\n{"text": "two"}\n')
    (tmp_path / "train.idx").write_bytes(pickle.dumps([(0, 15), (25, 15)]))
    config = _prep_config(tmp_path, tiny_model_dir)
    assert cli(["data", "pack_encoded_data", str(config)], capsys)[0] == 0


# ------------------------------------------------------------------ 3. files of a run folder that are links
def _one_more_step(config: Path, root: Path, tmp_path: Path) -> list[str]:
    """The `run` argv that resumes run `a` under `root` for a third step (its config with the target raised)."""
    resolved = yaml.safe_load(config.read_text())
    resolved["settings"]["training_target"]["num_target_steps"] = 3
    longer = write_yaml(tmp_path / "longer.yaml", resolved)
    return [
        "run",
        "--config_file_path",
        str(longer),
        "--experiments_root_path",
        str(root),
        "--experiment_id",
        "a",
        "--resume_from",
        "latest",
        "--allow_config_change",
    ]


def test_resume_replaces_links_in_the_run_folder_and_never_writes_through_them(finished_run, tmp_path, capsys):
    import shutil

    config, shared = finished_run
    root = tmp_path / "exp"
    shutil.copytree(shared / "a", root / "a")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked = ["report.md", "loss.png", "metrics.jsonl"]  # (eval_*.json: this run has no evaluators)
    for name in linked:
        (elsewhere / name).write_text(f"the user's own {name}\n")
        (root / "a" / name).unlink(missing_ok=True)
        (root / "a" / name).symlink_to(elsewhere / name)
    before = snapshot(elsewhere)
    # one more step, resumed from the last checkpoint
    argv = _one_more_step(config, root, tmp_path)
    code, err = cli(argv, capsys)
    assert code == 0, err
    assert_unchanged(before, snapshot(elsewhere))
    for name in linked:
        assert not (root / "a" / name).is_symlink() and (root / "a" / name).is_file(), name


def test_resume_with_tensorboard_folder_replaced_by_a_file_is_one_error(finished_run, tmp_path, capsys):
    import shutil

    config, shared = finished_run
    root = tmp_path / "exp"
    shutil.copytree(shared / "a", root / "a")
    shutil.rmtree(root / "a" / "tensorboard")
    (root / "a" / "tensorboard").write_text("not a folder")
    argv = _one_more_step(config, root, tmp_path)
    code, err = cli(argv, capsys)
    assert_one_error(code, err, "settings.loggers.tensorboard", "is a file")
    assert (root / "a" / "tensorboard").read_text() == "not a folder"


# ----------------------------------------------------------- 5, 6 and 7. interrupted, killed, a full first save
def _start_run(argv: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        lorafit_command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs
    )


def _wait_for_steps(metrics: Path, process: subprocess.Popen, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= steps:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {steps} steps in {timeout} s")


def _long_run(tmp_path: Path, model_dir: Path) -> tuple[dict, Path, list[str]]:
    """(config, its file, the `run` argv) of a run far longer than any test waits, with lorafit's default
    checkpointing (after the last step only): what an interrupt must not lose."""
    config = smallest_run_config(model_dir, LOREM, tmp_path / "cache" / "c", steps=20_000)
    del config["settings"]["intervals"]["checkpointing_interval_in_steps"]
    path = write_yaml(tmp_path / "config.yaml", config)
    argv = [
        "run",
        "--config_file_path",
        str(path),
        "--experiments_root_path",
        str(tmp_path / "exp"),
        "--experiment_id",
        "x",
    ]
    return config, path, argv


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_with_default_settings_saves_a_checkpoint_and_resumes(sig, tmp_path, tiny_model_dir):
    """No checkpoint interval (the default: only after the last step): Ctrl-C or SIGTERM still loses nothing."""
    config, path, argv = _long_run(tmp_path, tiny_model_dir)
    process = _start_run(argv)
    _wait_for_steps(tmp_path / "exp" / "x" / "metrics.jsonl", process, 3)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    message = assert_one_error(
        process.returncode,
        err,
        "interrupted after step",
        "--resume_from latest",
        "--experiment_id x",
        exit_code=128 + sig,
    )
    step = int(message.split("interrupted after step ")[1].split()[0])
    assert 3 <= step < 20_000
    assert (tmp_path / "exp" / "x" / "checkpoints" / f"step_{step:06d}" / "COMPLETE").is_file()
    # the run goes on from there, to the end
    config["settings"]["training_target"]["num_target_steps"] = step + 2
    write_yaml(path, config)
    result = lorafit_process([*argv, "--resume_from", "latest", "--allow_config_change"])
    assert result.returncode == 0, result.stderr
    assert f"step_{step + 2:06d}" in {p.name for p in (tmp_path / "exp" / "x" / "checkpoints").iterdir()}


def test_a_run_killed_before_its_first_checkpoint_names_the_way_out(tmp_path, tiny_model_dir, capsys):
    *_, argv = _long_run(tmp_path, tiny_model_dir)
    process = _start_run(argv)
    _wait_for_steps(tmp_path / "exp" / "x" / "metrics.jsonl", process, 2)
    process.kill()
    process.communicate(timeout=60)
    code, err = cli(argv, capsys)  # the same command again
    assert_one_error(code, err, "run folder already exists", "no checkpoint to continue from", "delete")
    code, err = cli([*argv, "--resume_from", "latest"], capsys)
    assert_one_error(
        code,
        err,
        "no complete checkpoint",
        "stopped before its first checkpoint",
        "another --experiment_id",
        f"delete {tmp_path / 'exp' / 'x'}",
    )


def test_a_full_disk_at_the_first_checkpoint_says_nothing_can_be_resumed(tmp_path, tiny_model_dir):
    import resource

    config = write_yaml(tmp_path / "c.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c"))

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    argv = [
        "run",
        "--config_file_path",
        str(config),
        "--experiments_root_path",
        str(tmp_path / "exp"),
        "--experiment_id",
        "x",
    ]
    process = _start_run(argv, preexec_fn=limit_file_size)
    _, err = process.communicate(timeout=120)
    message = assert_one_error(
        process.returncode,
        err,
        "saving a checkpoint: cannot write",
        str(tmp_path / "exp" / "x" / "checkpoints" / "step_000001"),
        "EFBIG",
        "nothing to resume",
    )
    assert "is kept" not in message and "complete checkpoints already written" not in message


# ------------------------------------------------------------------------- 9 and 10. tracebacks, type confusion
@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("settings.training_target.num_target_steps=true", ("num_target_steps", "got the boolean true")),
        ("model.config.r=true", ("model.config.r", "got the boolean true")),
        ("optimizer.config.lr=.inf", ("optimizer.config.lr", "finite number")),
        ("optimizer.config.lr=.nan", ("optimizer.config.lr", "finite number")),
    ],
)
def test_booleans_and_non_finite_numbers_are_not_numbers(override, fragments, tmp_path, tiny_model_dir, capsys):
    config = write_yaml(tmp_path / "c.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c"))
    code, err = cli(["validate", "--config_file_path", str(config), override], capsys)
    assert_one_error(code, err, *fragments)


def test_train_api_takes_paths_and_numpy_values(tmp_path, tiny_model_dir):
    import numpy as np

    import lorafit

    config = smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c")
    config["tokenizer"]["config"]["path"] = Path(config["tokenizer"]["config"]["path"])  # a Path in the dict
    config["optimizer"]["config"]["weight_decay"] = np.float32(0.0)  # numpy values in the dict too
    run_dir = lorafit.train(
        config,
        {"settings.seed": np.int64(3), "optimizer.config.lr": np.float64(0.002)},
        experiments_root_path=tmp_path / "exp",
        experiment_id="np",
    )
    resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    assert resolved["settings"]["seed"] == 3
    with pytest.raises(lorafit.errors.UserError, match=r"overrides\['settings.seed'\]: a object is not"):
        lorafit.train(config, {"settings.seed": object()}, experiments_root_path=tmp_path / "exp")


def test_a_damaged_save_to_disk_folder_is_one_error(tmp_path, tiny_model_dir, capsys):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["one document", "another one"]}).save_to_disk(str(folder))
    (folder / "state.json").write_text('{"_data_files": 3}')
    before = snapshot(tmp_path)
    pack = [
        "data",
        "pack",
        "--input",
        str(folder),
        "--tokenizer",
        str(tiny_model_dir),
        "--output",
        str(tmp_path / "out"),
        "--no_progress",
    ]
    code, err = cli(pack, capsys)
    assert_one_error(code, err, str(folder), "cannot read it with `datasets`")
    assert_unchanged(before, snapshot(tmp_path))


def test_wandb_directory_that_is_a_file_is_one_error_and_leaves_no_run_folder(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "wandb_here").write_text("a file")
    config = smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c")
    config["settings"]["loggers"] = {"wandb": {"mode": "offline", "directory": str(tmp_path / "wandb_here")}}
    path = write_yaml(tmp_path / "c.yaml", config)
    code, err = cli(
        [
            "run",
            "--config_file_path",
            str(path),
            "--experiments_root_path",
            str(tmp_path / "exp"),
            "--experiment_id",
            "w",
        ],
        capsys,
    )
    assert_one_error(code, err, "settings.loggers.wandb.directory", "is a file")
    assert not (tmp_path / "exp" / "w").exists()
    assert (tmp_path / "wandb_here").read_text() == "a file"


# ------------------------------------------------------------------------------------------ 11. messages
def test_data_pack_under_a_size_limit_leaves_no_temporary_files(tmp_path, tiny_model_dir):
    import resource

    source = tmp_path / "big.txt"
    source.write_text("\n\n".join(f"document {i} " + "words and more words " * 40 for i in range(400)))

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    (tmp_path / "out").mkdir()
    process = _start_run(
        [
            "data",
            "pack",
            "--input",
            str(source),
            "--tokenizer",
            str(tiny_model_dir),
            "--output",
            str(tmp_path / "out" / "p"),
            "--no_progress",
        ],
        preexec_fn=limit_file_size,
    )
    _, err = process.communicate(timeout=120)
    assert_one_error(process.returncode, err, "EFBIG")
    assert list((tmp_path / "out").iterdir()) == []


def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path, tiny_model_dir):
    source = tmp_path / "big.txt"
    source.write_text("\n\n".join(f"document {i} " + "words and more words " * 40 for i in range(40_000)))
    (tmp_path / "out").mkdir()
    process = _start_run(
        [
            "data",
            "pack",
            "--input",
            str(source),
            "--tokenizer",
            str(tiny_model_dir),
            "--output",
            str(tmp_path / "out" / "p"),
            "--no_progress",
        ]
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").iterdir()):  # the temporaries exist: packing has started
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.terminate()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_create_raw_index_of_a_folder_or_a_fifo_says_so(kind, tmp_path, capsys):
    target = tmp_path / "data.jsonl"
    target.mkdir() if kind == "folder" else os.mkfifo(target)
    code, err = cli(["data", "create_raw_index", str(target)], capsys)
    assert_one_error(code, err, str(target), "is a folder" if kind == "folder" else "not a regular file")


@pytest.mark.parametrize("experiment_id", ["   ", "run\x1bx", "-x", "tab\there"])
def test_experiment_ids_that_are_not_visible_folder_names_are_refused(experiment_id, tmp_path, tiny_model_dir, capsys):
    import lorafit

    config = write_yaml(tmp_path / "c.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c"))
    code, err = cli(
        [
            "run",
            "--config_file_path",
            str(config),
            "--experiments_root_path",
            str(tmp_path / "exp"),
            f"--experiment_id={experiment_id}",
        ],
        capsys,
    )
    assert_one_error(code, err, "--experiment_id", "visible folder name")
    with pytest.raises(lorafit.errors.UserError, match="visible folder name"):
        lorafit.train(config, experiments_root_path=tmp_path / "exp", experiment_id=experiment_id)
    assert not (tmp_path / "exp").exists() or list((tmp_path / "exp").iterdir()) == []


def test_a_config_of_50000_plain_keys_is_too_many_values_not_an_alias_bomb(tmp_path, tiny_model_dir, capsys):
    text = write_yaml(tmp_path / "c.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "c")).read_text()
    (tmp_path / "c.yaml").write_text(text + "extra:\n" + "".join(f"  key{i}: {i}\n" for i in range(50_001 * 2)))
    code, err = cli(["validate", "--config_file_path", str(tmp_path / "c.yaml")], capsys)
    message = assert_one_error(code, err, "too many values")
    assert "alias" not in message


def test_a_broken_link_as_the_run_folder_says_so(tmp_path, tiny_model_dir, capsys):
    config = write_yaml(tmp_path / "c.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c"))
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "x").symlink_to(tmp_path / "gone")
    code, err = cli(
        [
            "run",
            "--config_file_path",
            str(config),
            "--experiments_root_path",
            str(tmp_path / "exp"),
            "--experiment_id",
            "x",
        ],
        capsys,
    )
    assert_one_error(code, err, "broken link to", str(tmp_path / "gone"))
    assert not (tmp_path / "gone").exists()


# ------------------------------------------------------------------------------------- 8 and 9. export gguf
def test_export_gguf_of_a_run_config_without_an_adapter_is_refused(tmp_path, tiny_model_dir, capsys):
    """A run config names the base: exporting it alone would write the untrained model, exit 0, without a word."""
    config = write_yaml(tmp_path / "c.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c"))
    out = tmp_path / "model.gguf"
    code, err = cli(
        ["export", "gguf", "--model", str(config), "--output", str(out), "--pre-tokenizer", "gpt-2"], capsys
    )
    assert_one_error(code, err, "--model", "is a run config", "untrained base", "--adapter")
    assert not out.exists()


def test_export_gguf_under_a_file_size_limit_is_one_error_and_leaves_nothing(tmp_path, tiny_model_dir):
    import resource

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "model.gguf"
    process = _start_run(
        [
            "export",
            "gguf",
            "--model",
            str(tiny_model_dir),
            "--output",
            str(out),
            "--dtype",
            "f32",
            "--pre-tokenizer",
            "gpt-2",
        ],
        preexec_fn=limit_file_size,
    )
    _, err = process.communicate(timeout=180)
    assert_one_error(process.returncode, err, "--output", str(out), "cannot write")
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------- 11. refused by validate, not only by run
def test_packed_data_with_ids_beyond_the_models_vocabulary_is_refused_by_validate(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(100)])
    tokenizer.save_pretrained(tmp_path / "big_tokenizer")
    pack = [
        "data",
        "pack",
        "--input",
        str(LOREM),
        "--tokenizer",
        str(tmp_path / "big_tokenizer"),
        "--output",
        str(tmp_path / "packed"),
        "--no_progress",
    ]
    assert cli(pack, capsys)[0] == 0
    config = smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c")
    config["train_dataset"] = {
        "component_key": "dataset",
        "variant_key": "packed",
        "config": {"path": str(tmp_path / "packed")},
    }
    path = write_yaml(tmp_path / "config.yaml", config)
    code, err = cli(["validate", "--config_file_path", str(path)], capsys)
    assert_one_error(code, err, "train_dataset", "packed with a tokenizer of 484 tokens", "384 embedding rows")


def test_a_modalities_checkpointing_path_that_is_a_file_is_refused_by_validate(
    tmp_path, smollm2_dir, capsys, monkeypatch
):
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    (tmp_path / "not_a_folder").write_text("mine")
    argv = [
        "validate",
        "--config_file_path",
        "configs/modalities/config_lorem_ipsum_lora.yaml",
        "settings.training.sequence_length=128",
        "evaluation_subscriber.config.mode=OFFLINE",
        f"settings.paths.checkpointing_path={tmp_path / 'not_a_folder'}",
    ]
    code, err = cli(argv, capsys)
    message = assert_one_error(
        code,
        err,
        "checkpoint_saving.config.checkpoint_saving_execution.config.checkpoint_path",
        "is a file, not a folder",
    )
    assert "--experiments_root_path" not in message
    assert (tmp_path / "not_a_folder").read_text() == "mine"
