"""The end-of-run report: held-out metrics before and after training, and sample generations."""

from __future__ import annotations

from typing import Any


def _scalars(results: dict[str, Any] | None) -> dict[tuple[str, str], float]:
    out = {}
    for evaluator, values in (results or {}).items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[(evaluator, key)] = float(value)
    return out


def render_report(result, before: dict | None, after: dict | None) -> str:
    lines = ["# lorafit run report", ""]
    summary = getattr(result, "summary", None)
    if callable(summary):
        lines += [summary(), ""]
    b, a = _scalars(before), _scalars(after)
    if a:
        lines += ["| evaluator | metric | before | after | change |", "|---|---|---|---|---|"]
        for key in sorted(a):
            old, new = b.get(key), a[key]
            change = f"{new - old:+.4f}" if old is not None else ""
            old_text = f"{old:.4f}" if old is not None else "-"
            lines.append(f"| {key[0]} | {key[1]} | {old_text} | {new:.4f} | {change} |")
        lines.append("")
    for evaluator, values in (after or {}).items():
        samples_after = values.get("predictions") or []
        samples_before = ((before or {}).get(evaluator) or {}).get("predictions") or []
        for i, sample in enumerate(samples_after[:3]):
            lines.append(f"## sample {i + 1} ({evaluator})")
            lines.append(f"prompt:    {sample.get('question', '')!r}")
            lines.append(f"reference: {sample.get('reference', '')!r}")
            if i < len(samples_before):
                lines.append(f"before:    {samples_before[i].get('prediction', '')!r}")
            lines.append(f"after:     {sample.get('prediction', '')!r}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
