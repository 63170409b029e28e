"""What a run reports, from one `lorafit run` on a tiny Llama with TensorBoard, W&B (offline) and MLflow (SQLite
store, read by a plain client in another process): every tracker's own files are read back and hold the numbers
metrics.jsonl and eval_*.json hold, and report.md shows one number per thing, each found in the file it names."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from lorafit.cli import main
from tiny_runs import evaluated_run_config
from tracker_files import mlflow_metrics, wandb_config, wandb_history

STEPS = 4


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackers")
    loggers = {"wandb": {"mode": "OFFLINE", "project": "lorafit-test"}, "mlflow": {"experiment_name": "tiny"}}
    path = tmp / "tracked.yaml"
    path.write_text(yaml.safe_dump(evaluated_run_config(tiny_model_dir, tmp, loggers, steps=STEPS), sort_keys=False))
    assert (
        main(
            [
                "run",  # the kebab-case spellings; the other tests use Modalities' snake_case ones
                "--config-file-path",
                str(path),
                "--experiments-root-path",
                str(tmp / "exp"),
                "--experiment-id",
                "tracked",
            ]
        )
        == 0
    )
    return tmp / "exp" / "tracked"


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tracker key: {step: value}} from metrics.jsonl, named as trackers name them."""
    out: dict[str, dict[int, float]] = {}
    for record in _jsonl(run_dir):
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                out.setdefault(key if "/" in key else f"train/{key}", {})[record["step"]] = float(value)
    return out


def test_evaluator_metrics_reach_metrics_jsonl(tracked_run):
    before = json.loads((tracked_run / "eval_before.json").read_text())["qa"]
    after = json.loads((tracked_run / "eval_after.json").read_text())["qa"]
    expected = _expected(tracked_run)
    for metric in ("accuracy", "loss", "correct", "n"):
        assert expected[f"evaluator/qa/{metric}"] == {0: float(before[metric]), STEPS: float(after[metric])}
    assert set(expected["train/loss"]) == {3, 4} and set(expected["eval/lorem/loss"]) == {2, 4}


def test_wandb_offline_run_holds_every_number(tracked_run):
    expected = _expected(tracked_run)
    got: dict[str, dict[int, float]] = {}
    for row in wandb_history(tracked_run):
        for key, value in row.items():
            if not key.startswith("_"):
                got.setdefault(key, {})[row["_step"]] = value
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key
    config = wandb_config(tracked_run)
    assert config["model"]["config"]["r"] == 4  # the resolved config travels with the run


def test_mlflow_store_holds_every_number_for_a_plain_client(tracked_run):
    import os

    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # lorafit ran in this process and left its environment alone
    assert not (tracked_run / "mlruns").exists()
    got = mlflow_metrics(tracked_run)
    expected = _expected(tracked_run)
    assert got.keys() == expected.keys()
    for key in expected:
        assert dict(got[key]) == pytest.approx(expected[key], rel=1e-6), key


def test_tensorboard_events_hold_every_number(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"))
    events.Reload()
    expected = _expected(tracked_run)
    assert set(events.Tags()["scalars"]) == expected.keys()
    for key in expected:
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx(expected[key], rel=1e-6), key


def test_log_says_which_loggers_are_on_and_off(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    config = evaluated_run_config(tiny_model_dir, tmp_path, {"tensorboard": False, "wandb": {"mode": "disabled"}})
    config["settings"]["training_target"]["num_target_steps"] = 1
    del config["evaluators"]
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--experiments_root_path", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert (
        "loggers: metrics.jsonl; off: tensorboard (settings.loggers.tensorboard: false), "
        "wandb (settings.loggers.wandb.mode: disabled), mlflow (settings.loggers.mlflow not set)" in out
    )
    (run_dir,) = (tmp_path / "e").iterdir()
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "wandb").exists()


@pytest.mark.parametrize(("key", "module", "extra"), [("wandb", "wandb", "wandb"), ("mlflow", "mlflow", "mlflow")])
def test_missing_tracker_package_is_one_clear_error(tiny_model_dir, tmp_path, capsys, monkeypatch, key, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package gives
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(evaluated_run_config(tiny_model_dir, tmp_path, {key: {}})))
    assert main(["validate", "--config_file_path", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"settings.loggers.{key}: the '{module}' package is not installed; pip install 'lorafit[{extra}]'" in err
    assert main(["run", "--config_file_path", str(path), "--experiments_root_path", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


def test_bad_logger_settings_are_rejected_with_their_path(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(evaluated_run_config(tiny_model_dir, tmp_path, {"wandb": {"mode": "sometimes"}, "neptune": {}}))
    )
    assert main(["validate", "--config_file_path", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "settings.loggers.wandb.mode" in err and "offline" in err
    assert "settings.loggers.neptune" in err


def test_report_numbers_trace_to_files(tracked_run):
    report = (tracked_run / "report.md").read_text()
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and not set(cells[0]) <= {"-"}:
            rows[" ".join(cells[:2]) if cells[0].startswith("evaluators.") else cells[0]] = cells[1:]
    train = [r for r in _jsonl(tracked_run) if "loss" in r]
    # the first loss shown is the first one metrics.jsonl logged (step 3 with a log interval of 3), not step 1
    assert rows["train loss, first logged step"] == [str(train[0]["step"]), f"{train[0]['loss']:.4f}"]
    assert rows["train loss, last logged step"] == [str(train[-1]["step"]), f"{train[-1]['loss']:.4f}"]
    last_eval = [r for r in _jsonl(tracked_run) if "eval/lorem/loss" in r][-1]
    assert rows["eval_datasets.lorem loss (all target tokens)"] == ["4", f"{last_eval['eval/lorem/loss']:.4f}"]
    before = json.loads((tracked_run / "eval_before.json").read_text())["qa"]
    after = json.loads((tracked_run / "eval_after.json").read_text())["qa"]
    for metric in ("loss", "accuracy"):
        assert rows[f"evaluators.qa {metric}"][1:3] == [f"{before[metric]:.4f}", f"{after[metric]:.4f}"]
    # one number per thing: every loss shown is a different, labelled quantity
    losses = [key for key in rows if "loss" in key]
    assert len(losses) == len(set(losses)) == 4
    assert "## training (`metrics.jsonl`)" in report and "`eval_before.json` -> `eval_after.json`" in report


def test_readme_tracker_quickstart_commands_hold(smollm2_dir, tracked_run, monkeypatch):
    """The README's tracker commands: its `lorafit run` line is a valid command on the shipped config with the
    tracker turned on (validated, not trained: the tiny run above trains), and the folders it names exist."""
    import shlex

    repo = Path(__file__).resolve().parents[2]
    section = (repo / "README.md").read_text().split("### Watching a run")[1].split("\n## ")[0]
    (line,) = [x for x in section.splitlines() if x.startswith("lorafit run ")]
    words = shlex.split(line.split("  #")[0])[1:]
    assert "settings.loggers.wandb.mode=offline" in words
    i = words.index("--experiment-id")
    monkeypatch.chdir(repo)  # the shipped config's paths are relative to the repository
    assert main(["validate", *words[1:i], *words[i + 2 :]]) == 0
    for named in ("tensorboard", "wandb/latest-run"):
        assert f"experiments/demo/{named}" in section and (tracked_run / named).exists()


def test_wandb_online_without_an_account_is_one_clear_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no stored W&B login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    path = tmp_path / "c.yaml"
    config = evaluated_run_config(tiny_model_dir, tmp_path, {"wandb": {"mode": "online"}}, steps=1)
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--experiments-root-path", str(tmp_path / "e")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "settings.loggers.wandb: cannot start the W&B run (" in err and "mode: offline needs no account" in err
    assert "Traceback" not in err
    leftovers = sorted(p.name for p in (tmp_path / "e").iterdir()) if (tmp_path / "e").exists() else []
    assert leftovers == [], f"a run that could not start left {leftovers}: the same --experiment-id would be refused"


def test_a_resumed_run_continues_its_mlflow_run_and_w_and_b_id(tiny_model_dir, tmp_path):
    config = evaluated_run_config(tiny_model_dir, tmp_path, {"wandb": {}, "mlflow": {}}, steps=2)
    del config["evaluators"]
    config["settings"]["intervals"] = {"training_log_interval_in_steps": 1}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    common = ["--config", str(path), "--experiments-root-path", str(tmp_path / "e"), "--experiment-id", "x"]
    assert main(["run", *common]) == 0
    more = ["--resume-from", "latest", "--allow-config-change", "settings.training_target.num_target_steps=4"]
    assert main(["run", *common, *more]) == 0
    run_dir = tmp_path / "e" / "x"
    assert [step for step, _ in mlflow_metrics(run_dir)["train/loss"]] == [1, 2, 3, 4]  # one MLflow run
    # W&B keeps each offline part in its own folder under the same run id; `wandb sync` joins them
    # (two parts started in the same second: W&B names the second folder offline-run-<time>-x-1)
    parts = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(parts) == 2 and all(re.fullmatch(r"offline-run-\d{8}_\d{6}-x(-\d+)?", p.name) for p in parts), parts
