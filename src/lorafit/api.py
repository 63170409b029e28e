"""`lorafit.train`: `lorafit run` from Python (notebooks, scripts), with the same run folder and the same errors.

    import lorafit
    run_dir = lorafit.train("configs/smollm2_135m_lora.yaml",
                            overrides={"settings.training_target.num_target_steps": 10})
    run_dir = lorafit.train(config_dict, experiment_id="try-2")     # a config as a dict works too

Everything `lorafit run` checks is checked here, and a problem the user can fix raises `lorafit.errors.UserError`
(`ConfigError` for the config) carrying the message the command prints; nothing of the user's is overwritten.
Differences from the command, by nature: the run happens in this process (no re-execution under tbbmalloc:
set `LD_PRELOAD` yourself if you want it), and a dict config is first written to a temporary YAML file, which
becomes the run folder's `config.yaml` (`${lorafit_env:config_file_path}` names that temporary file).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


def train(
    config: str | os.PathLike | Mapping[str, Any],
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    experiments_root_path: str | os.PathLike = "experiments",
    experiment_id: str | None = None,
    resume_from: str | None = None,
    allow_config_change: bool = False,
) -> Path:
    """Train from a config file or dict, like `lorafit run`; returns the run folder.

    `overrides`: `["settings.seed=3", ...]` as on the command line, or `{"settings.seed": 3, ...}`; applied to the
    config before `${...}` is resolved (OmegaConf dotlist) and listed in config.resolved.yaml.
    `resume_from`: "latest", a run folder or a checkpoint folder, as `--resume_from`.
    """
    from lorafit.console import hide_library_progress_bars
    from lorafit.run.runner import RunRequest, run

    hide_library_progress_bars()
    items = _override_items(overrides)
    if isinstance(config, Mapping):
        with tempfile.TemporaryDirectory(prefix="lorafit-config-") as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(_plain(config, "config"), sort_keys=False), encoding="utf-8")
            return run(
                RunRequest(path, Path(experiments_root_path), experiment_id, resume_from, allow_config_change, items)
            )
    return run(
        RunRequest(Path(config), Path(experiments_root_path), experiment_id, resume_from, allow_config_change, items)
    )


def _override_items(overrides: Sequence[str] | Mapping[str, Any]) -> tuple[str, ...]:
    from lorafit.errors import UserError

    if isinstance(overrides, str):
        raise UserError(f"overrides: give a list of 'key=value' strings or a dict, not the string {overrides!r}")
    if isinstance(overrides, Mapping):
        # JSON is a subset of YAML, which is how OmegaConf reads a dotlist value: 3, "text", [1, 2], null, true
        return tuple(f"{key}={json.dumps(_plain(value, f'overrides[{key!r}]'))}" for key, value in overrides.items())
    if any(not isinstance(item, str) for item in overrides):
        raise UserError("overrides: a list holds 'key=value' strings; give a dict for values of other types")
    return tuple(overrides)


def _plain(value: Any, where: str) -> Any:
    """`value` as YAML's and JSON's plain types: paths become strings, numpy numbers and arrays Python's; any
    other object is refused naming where it is (yaml and json would raise a traceback on it)."""
    from lorafit.errors import UserError

    if value is None:
        return value
    for plain in (bool, int, float, str):  # also their subclasses (numpy.float64, numpy.str_), which YAML refuses
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays (and torch tensors) without importing them
    if callable(tolist) and type(value).__module__.split(".")[0] in ("numpy", "torch"):
        return _plain(tolist(), where)
    raise UserError(
        f"{where}: a {type(value).__name__} is not a config value; give numbers, strings, booleans, "
        "paths, lists or dicts"
    )
