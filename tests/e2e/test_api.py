"""`lorafit.train`: `lorafit run` from Python, with the same run folder, overrides and errors as the command."""

from __future__ import annotations

import json

import pytest
import yaml

import lorafit
from lorafit.cli import main
from lorafit.errors import ConfigError, UserError
from tiny_runs import evaluated_run_config


@pytest.fixture
def config(tiny_model_dir, tmp_path):
    config = evaluated_run_config(tiny_model_dir, tmp_path, steps=2)
    del config["evaluators"]
    config["settings"]["intervals"] = {"training_log_interval_in_steps": 1}
    return config


def _train_steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_train_from_a_dict_writes_the_run_folder(config, tmp_path):
    run_dir = lorafit.train(config, experiments_root_path=tmp_path / "exp", experiment_id="nb")
    assert run_dir == tmp_path / "exp" / "nb"
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == config
    assert _train_steps(run_dir) == [1, 2]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / "report.md").is_file()


def test_train_from_a_file_with_overrides_as_list_or_dict(config, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    # experiment ids given: the default one (time to the second + config file hash) repeats within a second
    one = lorafit.train(
        path,
        {"settings.training_target.num_target_steps": 1, "model.config.r": 2},
        experiments_root_path=tmp_path / "exp",
        experiment_id="one",
    )
    assert _train_steps(one) == [1]
    assert json.loads((one / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert (one / "config.yaml").read_bytes() == path.read_bytes()  # the user's file, overrides recorded beside it
    resolved = yaml.safe_load((one / "config.resolved.yaml").read_text())
    assert resolved["settings"]["training_target"]["num_target_steps"] == 1
    three = lorafit.train(
        str(path),
        ["settings.training_target.num_target_steps=3"],
        experiments_root_path=tmp_path / "exp",
        experiment_id="three",
    )
    assert _train_steps(three) == [1, 2, 3]


def test_errors_are_the_commands_errors(config, tmp_path, capsys):
    root = tmp_path / "exp"
    lorafit.train(config, experiments_root_path=root, experiment_id="taken")
    before = sorted(p.name for p in (root / "taken").iterdir())
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError) as raised:
        lorafit.train(path, experiments_root_path=root, experiment_id="taken")
    capsys.readouterr()
    assert main(["run", "--config", str(path), "--experiments-root-path", str(root), "--experiment-id", "taken"]) == 2
    assert " ".join(capsys.readouterr().err.split()) == " ".join(f"error: {raised.value.render()}".split())
    assert sorted(p.name for p in (root / "taken").iterdir()) == before  # nothing of the user's overwritten

    config["model"]["config"]["r"] = 0
    with pytest.raises(ConfigError, match=r"model\.config\.r"):
        lorafit.train(config, experiments_root_path=root)
    with pytest.raises(ConfigError, match="nope"):
        lorafit.train(path, ["settings.nope.deeper=1"], experiments_root_path=root)
    with pytest.raises(UserError, match="list of 'key=value'"):
        lorafit.train(path, "settings.seed=1", experiments_root_path=root)
