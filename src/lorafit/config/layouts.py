"""Other config layouts, mapped onto lorafit's before anything is checked: THE hook for them.

`lorafit run` and `lorafit validate` read a config as: load the YAML and resolve `${...}` (config/loader.py) ->
`normalize_layout` (here) -> check the whole graph and the run spec (job.check_run_config) -> build (job.build_run)
-> one typed `RunSettings` plus the built entities -> `TrainJob(settings=...)` -> the loop.

A layout is a function `(config: dict) -> dict | None`: given the resolved config, it returns the same config in
lorafit's layout (the `settings` block of `config/run_spec.py`, the run entities `model`, `train_dataset`, ...),
or None when the config is not in its layout. Register one with `@register_layout`. The first that answers
wins. A mapping must not drop anything: a key it cannot map stays where it is, so the checks that follow report
it with its path (and a key documented as having no effect must say so in the log).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Layout = Callable[[dict[str, Any]], dict[str, Any] | None]
LAYOUTS: list[Layout] = []


def register_layout(layout: Layout) -> Layout:
    LAYOUTS.append(layout)
    return layout


def normalize_layout(config: dict[str, Any]) -> dict[str, Any]:
    """`config` in lorafit's layout (unchanged when no registered layout recognises it)."""
    for layout in LAYOUTS:
        mapped = layout(config)
        if mapped is not None:
            return mapped
    return config
