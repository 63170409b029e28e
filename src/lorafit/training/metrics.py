"""What a run reports: `metrics.jsonl` (one JSON object per log step / evaluation), the same numbers to every
tracker of `settings.loggers` (TensorBoard by default, W&B, MLflow: lorafit/training/trackers.py), a rich progress
bar on a terminal, log lines with `step N/total` and an ETA otherwise, and `loss.png`.

Everything here is rank 0's job; other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lorafit.atomic import atomic_file, open_append, write_atomic
from lorafit.console import info, warn
from lorafit.training.trackers import LoggersConfig, Tracker, open_trackers, scalars

METRICS = "metrics.jsonl"


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    # ru_maxrss is in KiB on Linux: the process's peak resident memory so far
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


class MetricsLogger:
    """Appends to `<run_dir>/metrics.jsonl`; on resume, first drops lines after the resumed step (they belong to
    the part of the interrupted run that is being redone), so the file reads as one continuous run."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        progress: bool | None = None,
        trackers: list[Tracker] | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS
        self.total_steps, self.start_step = total_steps, start_step
        self.bar = None
        self.started = (start_step, time.perf_counter())  # the ETA: time per step since here
        # trackers given by the caller stay open (the runner logs evaluator results after training); None: the
        # default ones (TensorBoard), opened and closed here
        self.own_trackers = trackers is None
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        # records up to the resumed step stay (step 0: the evaluators' results before training)
        _truncate_after(self.path, start_step)
        self.file = open_append(self.path)  # closed in close()
        if trackers is None:
            trackers = open_trackers(LoggersConfig(), run_dir, Path(run_dir).name)
        self.trackers = trackers
        for tracker in trackers:
            restart = getattr(tracker, "restart_at", None)
            if callable(restart):
                restart(start_step)
        if progress if progress is not None else sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, status="")
            self.bar.start()

    def log(self, record: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, step)
        if echo:
            text = " ".join(_fmt(k, v) for k, v in record.items() if k != "step")
            if self.bar is not None:
                self.bar.console.print(f"step {step}/{self.total_steps} {text}", markup=False, highlight=False)
            else:  # a log file or CI: each line says where the run is and when it should end
                info(f"step {step}/{self.total_steps}{self._eta(step)} {text}")

    def _eta(self, step: int) -> str:
        done = step - self.started[0]
        per_step = (time.perf_counter() - self.started[1]) / max(done, 1)
        return f" eta {_duration(per_step * max(self.total_steps - step, 0))}"

    def advance(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, status=f"loss {loss:.4f}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.stop()
        if self.own_trackers:
            for tracker in self.trackers:
                tracker.close()
        self.file.close()


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key}={value:.4g}" if key != "lr" else f"{key}={value:.3e}"
    return f"{key}={value}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One record appended to metrics.jsonl outside the training loop (the evaluators' results)."""
    with open_append(Path(run_dir) / METRICS) as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
    return records


def _truncate_after(path: Path, step: int) -> None:
    if path.is_symlink():  # never read or written through: open_append replaces it with lorafit's own file
        return
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_loss(run_dir: Path) -> Path | None:
    """`loss.png`: training loss (and evaluation losses) against the step, from metrics.jsonl."""
    records = read_metrics(Path(run_dir) / METRICS)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn("matplotlib is not installed: no loss.png")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train")
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/") and k.endswith("/loss")})
    for key in eval_keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points, strict=True), marker="o", label=key.removeprefix("eval/").removesuffix("/loss"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    with atomic_file(out) as staging:  # savefig would follow a link at loss.png
        fig.savefig(staging, dpi=100, format="png")
    plt.close(fig)
    return out
