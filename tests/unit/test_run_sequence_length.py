"""One sequence length per run: a dataset that leaves its own null is given the settings' in its config when the
run is built (no build-context variable), and a dataset whose own differs is refused when the config is checked."""

from __future__ import annotations

import pytest

from tiny_runs import tiny_run_config


def test_a_dataset_sequence_length_that_differs_from_the_settings_is_refused(tmp_path, tiny_model_dir):
    from lorafit.errors import ConfigError
    from lorafit.run.build import check_run_config

    config = tiny_run_config(tiny_model_dir, cache_path=tmp_path / "cache", sequence_length=32)
    config["train_dataset"]["config"]["sequence_length"] = 32  # the same number: fine
    check_run_config(config)
    config["train_dataset"]["config"]["sequence_length"] = 16
    with pytest.raises(ConfigError) as raised:
        check_run_config(config)
    assert [p.path for p in raised.value.problems] == ["train_dataset.config.sequence_length"]
    assert "16 differs from settings.step_profile.sequence_length 32" in raised.value.problems[0].message


def test_a_dataset_that_leaves_it_null_gets_the_settings_length(tmp_path, tiny_model_dir):
    import yaml

    from lorafit.run.build import build_run, load_run_config

    config = tiny_run_config(tiny_model_dir, cache_path=tmp_path / "cache", sequence_length=24)
    assert config["train_dataset"]["config"].get("sequence_length") is None
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run = build_run(load_run_config(path)[1])
    assert run.train_dataset.sequence_length == 24 and len(run.train_dataset[0]["input_ids"]) == 24
