"""Shared pieces of the benchmark scripts: arguments, the model folder, child processes, statistics, output.

Every benchmark measures its contenders side by side in one invocation and alternates them (machines are
noisy: a slow minute hits every contender alike), repeats, and reports medians with min-max. Contenders
that allocate memory run in their own child process so that the peak RSS measured is theirs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = REPO / "data" / "models" / "SmolLM2-135M"
DEFAULT_OUT = BENCH_DIR / "results"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def base_parser(description: str, reps: int = 3) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="Hugging Face model folder (default: data/models/SmolLM2-135M, made by `lorafit models prepare "
        "smollm2-135m`); tests pass a tiny model here",
    )
    parser.add_argument("--reps", type=int, default=reps, help="repetitions of each contender (alternated)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for <name>.json and <name>.png")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's own choice, one per core). On a machine that others load, "
        "fewer threads than cores avoids stalls where one thread waits at a barrier for a descheduled one",
    )
    return parser


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def model_dir(path: Path) -> Path:
    """The model folder; the default SmolLM2 folder is prepared from the embedded GGUF when missing."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if path.resolve() == DEFAULT_MODEL.resolve():
        from lorafit.models.smollm2 import prepare_smollm2

        prepare_smollm2(path.parent)
        return path
    raise SystemExit(f"{path} is not a Hugging Face model folder (no config.json)")


def load_model(path: Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


# --- statistics and tables ---------------------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def ratio_summary(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Ratios of paired measurements (same repetition, measured next to each other)."""
    return summary([a / b for a, b in zip(num, den, strict=True)])


def fmt(value: float, digits: int = 3) -> str:
    """`digits` significant digits, without scientific notation for everyday magnitudes."""
    if abs(value) >= 10**digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_summary(s: dict[str, Any], digits: int = 3, unit: str = "") -> str:
    if len(s["values"]) == 1:
        return f"{fmt(s['median'], digits)}{unit}"
    return f"{fmt(s['median'], digits)}{unit} ({fmt(s['min'], digits)}-{fmt(s['max'], digits)})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *[line(r) for r in rows]])


# --- environment and output --------------------------------------------------------------------------------
def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["avx512"] = sorted(f for f in flags if f.startswith(("avx512", "amx")))
                break
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def write_results(out: Path, name: str, result: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), **result}
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def bar_with_range(ax, labels: Sequence[str], summaries: Sequence[dict[str, Any]], ylabel: str, title: str) -> None:
    """Bars at the medians with min-max whiskers."""
    med = [s["median"] for s in summaries]
    err = [
        [m - s["min"] for m, s in zip(med, summaries, strict=True)],
        [s["max"] - m for m, s in zip(med, summaries, strict=True)],
    ]
    ax.bar(range(len(labels)), med, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def save_figure(fig, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --- child processes ---------------------------------------------------------------------------------------
def run_child(argv: list[str], result_file: Path, log_file: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python argv...` to completion; its JSON result plus its own peak RSS (bytes) and wall time.

    The peak RSS comes from wait4's rusage of that child (its largest resident set, including model
    loading and imports), so contenders in separate processes do not see each other's memory.
    """
    result_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result_file.exists():
        tail = log_file.read_text()[-4000:]
        raise RuntimeError(f"benchmark child {' '.join(argv[:3])}... failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(result_file.read_text())
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    result["process_wall_s"] = wall
    return result


def torchrun_command(processes: int, script: str | Path, *args: str) -> list[str]:
    """`python -m torch.distributed.run` on this node with `processes` ranks running `script args...`, its
    rendezvous on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes)]
    return [*launcher, f"--rdzv-endpoint=127.0.0.1:{port}", str(script), *args]


def alternating(contenders: Sequence[str], reps: int) -> list[tuple[int, str]]:
    """(repetition, contender) in an order that alternates and also flips who goes first each repetition."""
    order = []
    for rep in range(reps):
        names = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
        order += [(rep, n) for n in names]
    return order
