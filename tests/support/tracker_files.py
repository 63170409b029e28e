"""Read what the trackers wrote, straight from their files: W&B's offline `run-*.wandb` and MLflow's file store."""

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


def mlflow_metrics(store: Path) -> dict[str, list[tuple[int, float]]]:
    """`{metric key: [(step, value), ...]}` of the one run in an MLflow file store (`<store>/<exp>/<run>/metrics`)."""
    (metrics_dir,) = [p for p in Path(store).glob("*/*/metrics") if p.is_dir()]
    out = {}
    for path in sorted(p for p in metrics_dir.rglob("*") if p.is_file()):
        rows = [line.split() for line in path.read_text().splitlines()]  # "<timestamp ms> <value> <step>"
        out[str(path.relative_to(metrics_dir))] = [(int(step), float(value)) for _t, value, step in rows]
    return out
