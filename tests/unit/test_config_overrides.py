"""Command-line overrides (`key.path=value`, OmegaConf's dotlist) after the config path."""

import pytest
import yaml

from lorafit.config.loader import apply_overrides, load_config
from lorafit.errors import ConfigError

BASE = {
    "settings": {"training": {"sequence_length": 2048, "gradient_acc_steps": 10}, "paths": {"p": "/raid/x"}},
    "dataset": {"config": {"sequence_length": "${settings.training.sequence_length}", "keys": ["a", "b"]}},
}


def test_overrides_set_existing_keys_with_yaml_types_and_interpolations_follow(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(
        path, overrides=["settings.training.sequence_length=128", "settings.paths.p=data/x", "dataset.config.keys[1]=c"]
    )
    assert config["settings"]["training"] == {"sequence_length": 128, "gradient_acc_steps": 10}
    assert config["dataset"]["config"] == {"sequence_length": 128, "keys": ["a", "c"]}
    assert config["settings"]["paths"]["p"] == "data/x"
    assert BASE["settings"]["training"]["sequence_length"] == 2048  # the input is not modified


def test_unknown_key_and_malformed_override_are_errors_listed_together():
    with pytest.raises(ConfigError) as e:
        apply_overrides(BASE, ["settings.training.sequence_lenght=128", "oops", "settings.x.y=1"])
    assert apply_overrides(BASE, ["dataset.config.new_key=3"])["dataset"]["config"]["new_key"] == 3
    text = e.value.render()
    assert "3 problems" in text and "settings.training.sequence_lenght" in text and "not key.path=value" in text
    # a typo gets the did-you-mean a typo in the file gets; a part with no near match lists what is there
    assert "no such key in the config (did you mean 'settings.training.sequence_length'?)" in text
    assert "no such key in the config; 'settings' has training, paths" in text
    with pytest.raises(ConfigError, match=r"did you mean 'dataset.config.keys\[0\]'"):
        apply_overrides(BASE, ["dataset.confg.keys[0]=z"])


@pytest.mark.integration  # a whole `lorafit run`
def test_run_records_overrides_in_resolved_config(tmp_path, tiny_model_dir):
    from lorafit.cli import main
    from tiny_runs import tiny_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tmp_path, steps=4)))
    assert main(["validate", "--config_file_path", str(path), "settings.training_target.num_target_steps=1"]) == 0
    assert (
        main(
            [
                "run",
                "--config_file_path",
                str(path),
                "--experiments_root_path",
                str(tmp_path / "exp"),
                "--experiment_id",
                "o",
                "settings.training_target.num_target_steps=1",
                "settings.intervals.evaluation_interval_in_steps=1",
            ]
        )
        == 0
    )
    text = (tmp_path / "exp/o/config.resolved.yaml").read_text()
    assert text.startswith("# command-line override: settings.training_target.num_target_steps=1\n")
    assert yaml.safe_load(text)["settings"]["training_target"]["num_target_steps"] == 1
    metrics = [line for line in (tmp_path / "exp/o/metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(metrics) == 1  # one step trained
    assert main(["validate", "--config_file_path", str(path), "settings.nope=1"]) == 2
