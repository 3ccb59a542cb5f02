"""Experiment trackers fed by the training loop: the records of metrics.jsonl, the run's settings
and its final scores, sent to TensorBoard, MLflow or trackio (`train.loggers=[tensorboard,mlflow]`).

    tensorboard  event files in RUN/tensorboard (`tensorboard --logdir runs`); a resumed run drops
                 the events after its checkpoint's step (purge_step), as metrics.jsonl is cut
    mlflow       a local store, RUN/mlflow.db (SQLite: MLflow's file store is retired), or
                 $MLFLOW_TRACKING_URI; experiment = the run directory's parent name, run = its
                 name; a resumed run continues the same MLflow run (its id is kept in RUN)
    trackio      Hugging Face's local tracker (its own store, $TRACKIO_DIR; `trackio show`);
                 project = the run directory's parent name

Each is an optional extra (`pip install 'slmkit[track]'`); a missing one is named before any work.
A scalar is logged under its record's kind: train/loss, train/lr, eval/val_loss...; settings are
flattened to dotted keys (lora.r, train.lr).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from slmkit.errors import SlmError

TRACKERS = ("tensorboard", "mlflow", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio"}


def check_loggers(names: list[str]) -> None:
    """Known names whose package is installed, or a one-line error naming the fix."""
    for name in names:
        if name not in TRACKERS:
            raise SlmError(f"unknown logger '{name}' in train.loggers (choose from {', '.join(TRACKERS)})")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise SlmError(f"train.loggers names {name}, which is not installed: pip install 'slmkit[track]' "
                           f"(or pip install {PACKAGES[name]})")


def flatten(settings: dict, prefix: str = "") -> dict[str, object]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}; lists and None become text (trackers take scalars)."""
    out = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value, default=str)
    return out


def scalars(row: dict) -> tuple[int, dict[str, float]]:
    """(step, {kind/name: value}) of a metrics.jsonl record."""
    kind = row.get("kind", "train")
    values = {f"{kind}/{k}": float(v) for k, v in row.items()
              if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return int(row.get("step", 0)), values


class Trackers:
    """The loop's one handle on every chosen tracker (rank 0 only)."""

    def __init__(self, names: list[str], run: Path, settings: dict, resume_step: int | None = None):
        check_loggers(names)
        self.backends = [_OPEN[name](run, flatten(settings), resume_step) for name in dict.fromkeys(names)]

    def log(self, row: dict) -> None:
        step, values = scalars(row)
        for backend in self.backends:
            backend.log(step, values)

    def finish(self, summary: dict) -> None:
        """The run's final scores (the last validation loss, the best one, where it stopped)."""
        values = {f"final/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
        for backend in self.backends:
            backend.finish(values)


class _TensorBoard:
    def __init__(self, run: Path, settings: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step)
        self.settings = settings
        self.writer.add_text("settings", "\n".join(f"    {k} = {v}" for k, v in settings.items()), 0)

    def log(self, step: int, values: dict) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self, values: dict) -> None:
        # hparams with the final scores: TensorBoard's HPARAMS tab compares runs on them
        hparams = {k: v for k, v in self.settings.items() if isinstance(v, (int, float, str, bool))}
        self.writer.add_hparams(hparams, values or {"final/steps": 0.0}, run_name=".")
        self.writer.close()


class _MLflow:
    def __init__(self, run: Path, settings: dict, resume_step: int | None):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run / 'mlflow.db').resolve()}"
        self.client = MlflowClient(uri)
        id_file = run / "mlflow_run_id"
        if resume_step is not None and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            return
        experiment = run.resolve().parent.name or "slmkit"
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run.name).info.run_id
        id_file.write_text(self.run_id)
        for key, value in settings.items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def log(self, step: int, values: dict) -> None:
        for name, value in values.items():
            self.client.log_metric(self.run_id, name, value, step=step)

    def finish(self, values: dict) -> None:
        for name, value in values.items():
            self.client.log_metric(self.run_id, name, value)
        self.client.set_terminated(self.run_id)


class _Trackio:
    def __init__(self, run: Path, settings: dict, resume_step: int | None):
        import trackio

        self.trackio = trackio
        trackio.init(project=run.resolve().parent.name or "slmkit", name=run.name, config=settings,
                     resume="allow" if resume_step is not None else "never", embed=False)

    def log(self, step: int, values: dict) -> None:
        self.trackio.log(values, step=step)

    def finish(self, values: dict) -> None:
        if values:
            self.trackio.log(values)
        self.trackio.finish()


_OPEN = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "trackio": _Trackio}
