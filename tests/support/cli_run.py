"""Running `lorafit` as a user does (a subprocess, or torchrun): shared by the CLI tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lorafit(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """`lorafit ARGS` as a user types it: one process, or torchrun with `processes`."""
    if processes == 1:
        launcher = [sys.executable, "-m", "lorafit"]
    else:
        rendezvous = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                    str(processes), rendezvous, str(REPO / "src/lorafit/__main__.py")]  # fmt: skip
    command = [*launcher, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def lorafit_run(config_path: Path, root: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    """`lorafit run --config_file_path ... --experiments_root_path ... EXTRA`."""
    args = ["run", "--config_file_path", str(config_path), "--experiments_root_path", str(root), *extra]
    return lorafit(*args, processes=processes)
