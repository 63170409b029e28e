"""`settings.training_target.num_target_epochs`: steps from the number of samples and the global batch, and what
`lorafit validate` says about it."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from lorafit.config.run_spec import RunSettings, describe_steps, num_steps
from lorafit.errors import UserError


def _settings(epochs: float, micro: int = 2, accum: int = 2) -> RunSettings:
    return RunSettings.model_validate(
        {
            "step_profile": {"local_train_micro_batch_size": micro, "gradient_accumulation_steps": accum},
            "training_target": {"num_target_epochs": epochs},
        }
    )


def test_steps_of_an_epoch_target():
    # 101 samples, global batch 2 x 2 x processes: the tail that does not fill a global batch waits
    assert num_steps(_settings(1), 1, 101) == 25
    assert num_steps(_settings(2), 1, 101) == 50
    assert num_steps(_settings(2), 2, 101) == 24  # 101 // 8 = 12 per epoch
    assert num_steps(_settings(0.5), 1, 101) == 12
    assert num_steps(_settings(2.3, micro=1, accum=1), 1, 10) == 23  # not 22 (2.3 x 10 in floats)
    assert num_steps(_settings(0.01), 1, 101) == 1  # at least one step
    with pytest.raises(
        UserError, match="num_target_epochs: the training data has 3 samples, fewer than one global batch of 4"
    ):
        num_steps(_settings(1), 1, 3)


def test_an_epoch_target_goes_alone():
    with pytest.raises(ValidationError, match="num_target_epochs goes alone"):
        RunSettings.model_validate({"training_target": {"num_target_epochs": 1, "num_target_steps": 3}})
    with pytest.raises(ValidationError, match="greater than 0"):
        RunSettings.model_validate({"training_target": {"num_target_epochs": 0}})


def test_describe_steps_with_and_without_the_data():
    text = describe_steps(_settings(3), None)
    assert "steps: counted from the data at the start of the run" in text and "not tokenized yet" in text
    text = describe_steps(_settings(3), 101)
    assert "steps: 75 (one process)" in text
    assert "101 training samples" in text and "2 processes: 12 steps per epoch, 36 in all" in text
    assert "8 processes: 3 steps per epoch, 9 in all" in text


@pytest.mark.integration  # a whole `lorafit run`
def test_validate_and_run_with_an_epoch_target(tmp_path, tiny_model_dir, capsys):
    from lorafit.cli import main
    from tiny_runs import tiny_run_config

    config = tiny_run_config(
        tiny_model_dir,
        cache_path=tmp_path / "cache" / "lorem",
        micro=2,
        accum=1,
        sequence_length=64,
        intervals={"training_log_interval_in_steps": 1},
    )
    config["settings"]["training_target"] = {"num_target_epochs": 1}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", "--config", str(path)]) == 0
    assert "the data is not tokenized yet" in capsys.readouterr().out
    assert main(["data", "preview", "--config", str(path), "-n", "1"]) == 0
    samples = int(capsys.readouterr().out.split("samples of up to")[0].rsplit(" ", 2)[-2].replace(",", ""))
    assert main(["validate", "--config", str(path)]) == 0
    assert f"steps: {samples // 2} (one process)" in capsys.readouterr().out
    assert (
        main(["run", "--config", str(path), "--experiments_root_path", str(tmp_path / "exp"), "--experiment_id", "e"])
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "exp" / "e" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "loss" in r) == samples // 2


def test_validate_counts_an_hf_datasets_text_cache_as_text_blocks(tmp_path, tiny_model_dir, capsys):
    """Under validate the dataset is built without its data: the kind comes from the existing cache's index."""
    from lorafit.cli import main
    from tiny_runs import tiny_run_config

    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i}: " + "lorem ipsum " * 30}) + "\n" for i in range(20)))
    config = tiny_run_config(tiny_model_dir, cache_path=tmp_path / "unused", micro=1, accum=1, sequence_length=32)
    config["train_dataset"] = {
        "component_key": "dataset",
        "variant_key": "hf_datasets",
        "config": {"path": str(data), "tokenizer": {"instance_key": "tokenizer", "pass_type": "BY_REFERENCE"}},
    }
    config["settings"]["training_target"] = {"num_target_epochs": 2}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["data", "preview", "--config", str(path), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "train_dataset: PackedDataset" in out  # text blocks, not conversations
    samples = int(out.split("samples of up to")[0].rsplit(" ", 2)[-2].replace(",", ""))
    assert main(["validate", "--config", str(path)]) == 0
    assert f"steps: {2 * samples} (one process)" in capsys.readouterr().out
