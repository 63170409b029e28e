"""MLflow's store: lorafit leaves MLFLOW_ALLOW_FILE_STORE to the user. Asked for a folder store without it, the run
stops with the variable that opens one and the default that needs none (an SQLite store in the run folder, read by
a plain client in tests/e2e/test_run_outputs.py)."""

from __future__ import annotations

import os

import pytest

from lorafit.errors import ConfigError
from lorafit.training.trackers import MlflowConfig, open_mlflow


def test_a_file_store_is_refused_with_what_opens_it_and_the_environment_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    config = MlflowConfig(tracking_uri=(tmp_path / "mlruns").as_uri())
    with pytest.raises(ConfigError) as refused:
        open_mlflow(config, tmp_path, "run")
    message = str(refused.value)
    assert "MLFLOW_ALLOW_FILE_STORE=true" in message and "leave tracking_uri out" in message
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's choice is honoured
    tracker = open_mlflow(config, tmp_path, "run")
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.close()
    assert any((tmp_path / "mlruns").rglob("train/loss"))
