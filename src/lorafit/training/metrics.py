"""What a run reports: `metrics.jsonl` (one JSON object per log step / evaluation), TensorBoard scalars (when
`torch.utils.tensorboard` imports), a rich progress bar on a terminal, log lines otherwise, and `loss.png`.

Everything here is rank 0's job; other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from lorafit.console import info, warn

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

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool | None = None):  # fmt: skip
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if start_step > 0:
            _truncate_after(self.path, start_step)
        elif self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional
            self.writer = None
        if progress if progress is not None else sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[status]}"))  # fmt: skip
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, status="")
            self.bar.start()

    def log(self, record: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if echo:
            text = " ".join(_fmt(k, v) for k, v in record.items())
            if self.bar is not None:
                self.bar.console.print(text, markup=False, highlight=False)
            else:
                info(text)

    def advance(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, status=f"loss {loss:.4f}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.stop()
        if self.writer is not None:
            self.writer.close()
        self.file.close()


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key}={value:.4g}" if key != "lr" else f"{key}={value:.3e}"
    return f"{key}={value}"


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
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)


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
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
