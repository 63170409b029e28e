"""Where a run's numbers go besides `metrics.jsonl`: TensorBoard, Weights & Biases, MLflow.

Chosen in the config's `settings.loggers` block (checked by `LoggersConfig`, lorafit/config/loggers.py):

    settings:
      loggers:
        tensorboard: true          # default true: <run folder>/tensorboard/ (pip install 'lorafit[tensorboard]')
        wandb:                     # default off (pip install 'lorafit[wandb]')
          mode: offline            # offline | online | disabled (Modalities' OFFLINE/ONLINE/DISABLED too)
          project: lorafit
          directory: null          # default: the run folder; wandb writes <directory>/wandb/<run>/
          name: null               # default: the experiment id
        mlflow:                    # default off (pip install 'lorafit[mlflow]')
          tracking_uri: null       # default: an SQLite store, <run folder>/mlflow.db
          experiment_name: lorafit
          run_name: null           # default: the experiment id

Every tracker gets the same numbers as metrics.jsonl: training records (`train/loss`, `train/lr`, ...), the
in-loop evaluation losses (`eval/<dataset>/loss`) and the evaluators' metrics (`evaluator/<name>/<metric>`,
before training at step 0 and after it at the last step). Only rank 0 opens trackers. A resumed run continues
its MLflow run (found by run name) and its W&B run id (offline, each part is a folder with that id; `wandb sync`
joins them).

MLflow's default store is an SQLite file in the run folder, which every MLflow client opens as it is
(`mlflow ui --backend-store-uri sqlite:///<run folder>/mlflow.db`). MLflow 3 refuses its older folder store
(`file:` URIs, `mlruns/`) unless the user sets MLFLOW_ALLOW_FILE_STORE=true; lorafit never sets it for them.

From Python (also how a Modalities `results_subscriber/wandb` component maps onto lorafit: its `project`,
`mode` and `directory` are `WandbConfig`'s fields, its `experiment_id` is the run's id, and its
`global_rank`/`config_file_path` need no counterpart: only rank 0 logs, and the resolved config is sent):

    from lorafit.training.trackers import WandbConfig, open_wandb
    tracker = open_wandb(WandbConfig(mode="offline", project="p"), run_dir, "my-run", run_config={...})
    tracker.log({"train/loss": 1.5}, step=1)
    tracker.close()
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

from lorafit.atomic import own_folder
from lorafit.config.loggers import LoggersConfig, MlflowConfig, WandbConfig
from lorafit.console import info
from lorafit.errors import ConfigError, Problem


class Tracker(Protocol):
    name: str

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _missing(key: str, package: str, extra: str) -> ConfigError:
    return ConfigError(
        f"the '{package}' package is not installed; pip install 'lorafit[{extra}]' (or remove {key})", field=key
    )


class TensorBoardTracker:
    """Event files in `log_dir`, opened at the first value (so a resumed run can first say where it restarts)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        # checked now, made by the first value (a run that fails to start leaves no folder behind)
        self.log_dir = own_folder(log_dir, "settings.loggers.tensorboard", create=False)
        self.writer = None
        self.purge_step: int | None = None

    def restart_at(self, step: int) -> None:
        """Resuming at `step`: TensorBoard drops the earlier files' events after it (the redone part)."""
        if self.writer is None and step > 0:
            self.purge_step = step + 1

    def log(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, run):
        self.run = run

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_wandb(config: WandbConfig, run_dir: Path, experiment_id: str, run_config: dict | None = None) -> WandbTracker:
    try:
        import wandb
    except ImportError:
        raise _missing("settings.loggers.wandb", "wandb", "wandb") from None
    if config.directory is None:  # the run folder's own wandb/, never written through a link
        directory = Path(run_dir)
        own_folder(directory / "wandb", "settings.loggers.wandb", create=False)
    else:  # the user's folder, links and all; a file there is refused before W&B makes anything
        directory = Path(config.directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # FileExistsError / NotADirectoryError: a file at or above it
            what = "is a file, not a folder" if directory.is_file() else f"cannot be made ({error.strerror})"
            raise ConfigError(f"{directory} {what}", field="settings.loggers.wandb.directory") from None
    try:
        run = wandb.init(
            project=config.project,
            entity=config.entity,
            name=config.name or experiment_id,
            id=_wandb_id(experiment_id),
            resume="allow",
            mode=config.mode,
            dir=str(directory),
            config=run_config or {},
            settings=wandb.Settings(console="off", silent=True),
        )
    except wandb.errors.Error as e:  # e.g. online without `wandb login`
        raise ConfigError(
            f"cannot start the W&B run ({_first_line(e)}); mode: offline needs no account",
            field="settings.loggers.wandb",
        ) from None
    return WandbTracker(run)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _wandb_id(experiment_id: str) -> str:
    # W&B run ids may not hold '/', '\\', '#', '?', '%', ':'; the same id lets a resumed run continue its W&B run
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in experiment_id)[:64]


def open_mlflow(
    config: MlflowConfig, run_dir: Path, experiment_id: str, run_config: dict | None = None
) -> MlflowTracker:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise _missing("settings.loggers.mlflow", "mlflow", "mlflow") from None
    run_dir = Path(run_dir).resolve()
    uri = config.tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient(tracking_uri=uri)
        # the default store's artifact folder (no artifacts so far) beside it, not ./mlruns of the working folder;
        # another store keeps its own default
        artifacts = (run_dir / "mlartifacts").as_uri() if config.tracking_uri is None else None
        return _start_mlflow(client, config, experiment_id, run_config, artifacts)
    except MlflowException as e:
        hint = ""
        if (uri.startswith("file:") or "://" not in uri) and not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
            hint = (
                "; MLflow 3 opens a file store only with MLFLOW_ALLOW_FILE_STORE=true in the environment: set it, "
                "or leave tracking_uri out for an SQLite store in the run folder"
            )
        raise ConfigError(
            f"cannot start the MLflow run at {uri} ({_first_line(e)}){hint}", field="settings.loggers.mlflow"
        ) from None
    except ImportError as e:  # the SQLite store needs sqlalchemy and alembic (the mlflow extra installs them)
        raise ConfigError(
            f"cannot open the MLflow store at {uri}: {e}; pip install 'lorafit[mlflow]'",
            field="settings.loggers.mlflow",
        ) from None


def _start_mlflow(
    client, config: MlflowConfig, experiment_id: str, run_config: dict | None, artifacts: str | None
) -> MlflowTracker:
    experiment = client.get_experiment_by_name(config.experiment_name)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(config.experiment_name, artifacts)
    name = config.run_name or experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.mlflow.runName = '{name}'", max_results=1)
    if found:  # a resumed lorafit run continues its MLflow run
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp_id, run_name=name).info.run_id
        for key, value in _flat(run_config or {}).items():
            client.log_param(run_id, key[:250], str(value)[:6000])
    return MlflowTracker(client, run_id)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def open_trackers(
    config: LoggersConfig, run_dir: Path, experiment_id: str, *, run_config: dict | None = None
) -> list[Tracker]:
    """The trackers `config` asks for, opened; says in the log which are on and which are off (and why)."""
    trackers: list[Tracker] = []
    off: list[str] = []
    if config.tensorboard is False:
        off.append("tensorboard (settings.loggers.tensorboard: false)")
    else:
        try:
            import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
        except ImportError:
            if config.tensorboard:
                raise _missing("settings.loggers.tensorboard", "tensorboard", "tensorboard") from None
            off.append("tensorboard (package not installed: pip install 'lorafit[tensorboard]')")
        else:
            trackers.append(TensorBoardTracker(Path(run_dir) / "tensorboard"))
    for key, conf, opener in (("wandb", config.wandb, open_wandb), ("mlflow", config.mlflow, open_mlflow)):
        if conf is None:
            off.append(f"{key} (settings.loggers.{key} not set)")
        elif isinstance(conf, WandbConfig) and conf.mode == "disabled":
            off.append("wandb (settings.loggers.wandb.mode: disabled)")
        else:
            try:
                trackers.append(opener(conf, run_dir, experiment_id, run_config))
            except BaseException:
                for tracker in trackers:  # the ones already open end cleanly (a W&B run would stay "running")
                    tracker.close()
                raise
    info(f"loggers: metrics.jsonl{''.join(', ' + t.name for t in trackers)}; off: {', '.join(off) or 'none'}")
    return trackers


def missing_packages(config: LoggersConfig) -> list[Problem]:
    """Trackers the config asks for whose package is not installed (for `lorafit validate` and before building)."""
    import importlib.util

    wanted = [
        ("tensorboard", "tensorboard", "tensorboard", config.tensorboard is True),
        ("wandb", "wandb", "wandb", config.wandb is not None and config.wandb.mode != "disabled"),
        ("mlflow", "mlflow", "mlflow", config.mlflow is not None),
    ]
    return [
        _missing(f"settings.loggers.{key}", module, extra).problems[0]
        for key, module, extra, asked in wanted
        if asked and importlib.util.find_spec(module) is None
    ]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record, named as trackers show them (`loss` -> `train/loss`)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[key if "/" in key else f"train/{key}"] = float(value)
    return out


__all__ = ["LoggersConfig", "MlflowConfig", "Tracker", "WandbConfig", "open_mlflow", "open_trackers", "open_wandb"]
