"""Read what the trackers wrote, straight from their files: W&B's offline `run-*.wandb`, and MLflow's store through a
plain MLflow client in another process (no MLFLOW_ALLOW_FILE_STORE, nothing lorafit set up)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024  # W&B's run file is a LevelDB log: 32 KiB blocks of records with a 7-byte header each
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(run_file: Path) -> list:
    """Every `wandb_internal_pb2.Record` of an offline run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # the rest of a block too small for a header is padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    """The rows `run.log` wrote (with `_step`) into the one offline W&B run under `run_dir/wandb`."""
    (run_file,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def wandb_config(run_dir: Path) -> dict:
    (run_file,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    config = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config |= {i.key: json.loads(i.value_json) for i in updates}
    return config


MLFLOW_READER = """
import json, sys
from mlflow.tracking import MlflowClient

client = MlflowClient(tracking_uri=sys.argv[1])
(run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
history = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
print(json.dumps({key: sorted((m.step, m.value) for m in values) for key, values in history.items()}))
"""


def mlflow_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """`{metric key: [(step, value), ...]}` of the one run in the MLflow store lorafit wrote into `run_dir`, read by
    a plain `MlflowClient` in a fresh process, as a user would open it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    uri = f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
    child = subprocess.run(
        [sys.executable, "-c", MLFLOW_READER, uri], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return {
        key: [(int(step), float(value)) for step, value in rows]
        for key, rows in json.loads(child.stdout.strip().splitlines()[-1]).items()
    }
