"""The end-of-run report (`report.md`), written only from the run folder's files.

One number per thing, and each says where it comes from: training numbers from `metrics.jsonl` (the first and
last *logged* training records, with their steps), the in-loop evaluation losses of `eval_datasets` from
`metrics.jsonl`, the evaluators' numbers from `eval_before.json` / `eval_after.json`. An eval dataset and an
evaluator may share a name (`heldout`) while measuring different things (packed blocks, all tokens vs the
reference answers only), so they are shown under different labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafit.training.metrics import METRICS, read_metrics


def _scalars(results: dict[str, Any] | None) -> dict[tuple[str, str], int | float]:
    out = {}
    for evaluator, values in (results or {}).items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[(evaluator, key)] = value
    return out


def _num(value: int | float, sign: bool = False) -> str:
    """Counts as integers, measurements with 4 decimals: what the JSON file holds, rounded."""
    return (f"{value:+d}" if sign else str(value)) if isinstance(value, int) else f"{value:{'+' if sign else ''}.4f}"


def _read_json(path: Path) -> dict[str, Any] | None:
    """The run's own JSON file, or None: absent, a link (never read through), or damaged (the report goes on)."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _training_lines(records: list[dict[str, Any]]) -> list[str]:
    train = [r for r in records if "loss" in r]
    if not train:
        return []
    first, last = train[0], train[-1]
    lines = [f"## training (`{METRICS}`)", "", "| what | step | value |", "|---|---|---|"]
    lines.append(f"| train loss, first logged step | {first['step']} | {first['loss']:.4f} |")
    lines.append(f"| train loss, last logged step | {last['step']} | {last['loss']:.4f} |")
    shown = {
        "tokens": "tokens trained",
        "elapsed_s": "time (s)",
        "tokens_per_s": "tokens/s (last window)",
        "peak_rss_mb": "peak RSS (MB)",
    }
    for key, label in shown.items():
        if key in last:
            value = last[key]
            lines.append(
                f"| {label} | {last['step']} | {value:,} |"
                if isinstance(value, int)
                else f"| {label} | {last['step']} | {value:,.1f} |"
            )
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if evals:
        last_eval = evals[-1]
        for key in sorted(k for k in last_eval if k.startswith("eval/") and k.endswith("/loss")):
            name = key.removeprefix("eval/").removesuffix("/loss")
            lines.append(
                f"| eval_datasets.{name} loss (all target tokens) | {last_eval['step']} | {last_eval[key]:.4f} |"
            )
    return [*lines, ""]


def _evaluator_lines(before: dict | None, after: dict | None) -> list[str]:
    b, a = _scalars(before), _scalars(after)
    if not a:
        return []
    source = "`eval_before.json` -> `eval_after.json`" if before else "`eval_after.json`"
    lines = [
        f"## evaluators ({source})",
        "",
        "| evaluator | metric | before | after | change |",
        "|---|---|---|---|---|",
    ]
    for key in sorted(a):
        old, new = b.get(key), a[key]
        change = _num(new - old, sign=True) if old is not None else ""
        old_text = _num(old) if old is not None else "-"
        lines.append(f"| evaluators.{key[0]} | {key[1]} | {old_text} | {_num(new)} | {change} |")
    lines.append("")
    for evaluator, values in (after or {}).items():
        samples_after = values.get("predictions") or []
        samples_before = ((before or {}).get(evaluator) or {}).get("predictions") or []
        for i, sample in enumerate(samples_after[:3]):
            lines.append(f"### sample {i + 1} ({evaluator})")
            lines.append(f"prompt:    {sample.get('question', '')!r}")
            lines.append(f"reference: {sample.get('reference', '')!r}")
            if i < len(samples_before):
                lines.append(f"before:    {samples_before[i].get('prediction', '')!r}")
            lines.append(f"after:     {sample.get('prediction', '')!r}")
            lines.append("")
    return lines


def render_report(run_dir: Path, result: Any = None) -> str:
    """report.md of `run_dir`; `result` (a TrainResult) only adds where the run resumed from and what it wrote."""
    run_dir = Path(run_dir)
    lines = ["# lorafit run report", ""]
    lines += _training_lines(read_metrics(run_dir / METRICS))
    lines += _evaluator_lines(_read_json(run_dir / "eval_before.json"), _read_json(run_dir / "eval_after.json"))
    outputs = [f"resumed from: {result.resumed_from}"] if getattr(result, "resumed_from", None) else []
    outputs += [f"{name}/: {run_dir / name}" for name in ("adapter", "model", "merged") if (run_dir / name).is_dir()]
    if outputs:
        lines += ["## outputs", "", *outputs, ""]
    return "\n".join(lines).rstrip() + "\n"
