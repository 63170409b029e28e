"""Starting processes in the tests, in one place: `lorafit` as a user runs it (a subprocess, or torchrun), and a
test's own function in 2 ranks of a gloo process group (`spawn_ranks`). Both take their port from `free_port`."""

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


def dead_pid() -> int:
    """The id of a process that has ended (a child that printed it and exited): what a killed writer leaves in the
    names of its temporaries. A Python start-up, ~20 ms: cheap enough for the fast tests."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(child.stdout)


def lorafit_command(*args: str, processes: int = 1) -> list[str]:
    """The command line of `lorafit ARGS`: one process, or torchrun with `processes` on a free port."""
    if processes == 1:
        return [sys.executable, "-m", "lorafit", *args]
    rendezvous = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(processes),
        rendezvous,
        str(REPO / "src/lorafit/__main__.py"),
    ]
    return [*launcher, *args]


def lorafit(
    *args: str, processes: int = 1, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`lorafit ARGS` as a user types it (see `lorafit_command`), from `cwd`, with `env` added to the environment.
    One thread per process unless `env` says otherwise: several processes share the build machine's 2 cores."""
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = lorafit_command(*args, processes=processes)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environ, cwd=cwd)


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def lorafit_run(config_path: Path, root: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    """`lorafit run --config_file_path ... --experiments_root_path ... EXTRA`."""
    args = ["run", "--config_file_path", str(config_path), "--experiments_root_path", str(root), *extra]
    return lorafit(*args, processes=processes)


def spawn_ranks(worker, *args, world: int = 2) -> None:
    """`worker(rank, world, *args)` in `world` fresh processes (torch.multiprocessing.spawn), each with the
    environment torchrun gives (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) and one thread; the
    worker opens the process group itself. Returns when all ranks finished; a rank's exception fails the test.
    `worker` must be a module-level function (the new processes import it by name)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(world, free_port(), worker, args), nprocs=world, join=True)


def _rank(rank: int, world: int, port: int, worker, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    import torch

    torch.set_num_threads(1)  # two processes on a shared 2-core machine
    worker(rank, world, *args)
