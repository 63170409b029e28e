"""Regenerate docs/configs.md from the component registry (a test checks it is up to date)."""

from __future__ import annotations

import sys
from pathlib import Path

HEADER = """# Config reference

Generated from the component registry by `python scripts/gen_config_docs.py`; `lorafit components` prints the
same. Every component is written `{component_key: ..., variant_key: ..., config: {...}}`; a field of type
`component X` takes an inline component of that kind or a reference `{instance_key: NAME, pass_type: BY_REFERENCE}`.

## The run: settings and entities

"""


def render() -> str:
    from lorafit.components import load_builtin_components
    from lorafit.config import run_spec
    from lorafit.config.describe import describe_components, field_rows
    from lorafit.config.registry import REGISTRY
    from lorafit.training import trackers

    load_builtin_components()
    parts = [HEADER, (run_spec.__doc__ or "").split("\n", 2)[2].strip(), "", "### `settings`", ""]
    for name, model in [
        ("settings", run_spec.RunSettings),
        ("settings.step_profile", run_spec.StepProfile),
        ("settings.training_target", run_spec.TrainingTarget),
        ("settings.intervals", run_spec.Intervals),
        ("settings.checkpointing", run_spec.Checkpointing),
        ("settings.export", run_spec.Export),
        ("settings.loggers", trackers.LoggersConfig),
        ("settings.loggers.wandb", trackers.WandbConfig),
        ("settings.loggers.mlflow", trackers.MlflowConfig),
    ]:
        parts += [
            f"`{name}`" + (f": {model.__doc__.strip().splitlines()[0]}" if model.__doc__ else ""),
            "",
            "| key | type | default |",
            "|---|---|---|",
        ]
        parts += [f"| `{n}` | `{t}` | `{d}` |" for n, t, d, _ in field_rows(model)]
        parts.append("")
    parts += ["## Components", "", describe_components(REGISTRY, markdown=True, builtin_only=True)]
    return "\n".join(parts).rstrip() + "\n"


def main() -> int:
    out = Path(__file__).resolve().parents[1] / "docs" / "configs.md"
    out.write_text(render(), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
