"""Tracking sinks: per-round metrics (ε included) of a run, also sent to TensorBoard or MLflow.

``[run] log = ["tensorboard", "mlflow"]`` turns them on; a plain run uses none and needs neither
package. Each sink has the same tiny interface, called by :class:`fedsim.results.RunRecorder` where
it writes ``metrics.jsonl``: ``open(run_dir, scenario, first_round)``, ``log(round, metrics)`` with
the round's row (every finite number in it becomes a scalar at step = round), ``close(status)``.

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` writing event files to
  ``RUN_DIR/tensorboard/`` (``tensorboard --logdir runs/``); a resumed run purges the steps after its
  checkpoint, so every round appears once. Needs the ``tensorboard`` package
  (``pip install fedsim[tensorboard]``).
* ``mlflow``: one MLflow run per fedsim run, in the experiment named after ``run.name``, through
  ``MlflowClient`` (no process-global active run, so runs in threads do not mix); the tracking URI is
  ``MLFLOW_TRACKING_URI`` when set, else a local file store ``RUN_DIR/mlruns`` (no server:
  ``mlflow ui --backend-store-uri RUN_DIR/mlruns``). The scenario's keys are the run's parameters;
  its status follows the fedsim run's ending. Needs ``pip install fedsim[mlflow]``.

A sink whose package is missing is refused before anything is written, with a
:class:`~fedsim.errors.ConfigError` naming ``run.log`` and the ``pip install`` that fixes it; a sink
that fails while writing fails the run (it never drops metrics silently).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError

#: sink name -> the package it needs (also the name of fedsim's optional extra)
SINK_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def check_sinks(names: list[str]) -> list[str]:
    """``names`` if every one is a known sink, listed once, whose package is installed; else a
    :class:`ConfigError` naming ``run.log``. Nothing is imported (``importlib.util.find_spec``)."""
    for name in names:
        if name not in SINK_PACKAGES:
            raise ConfigError("run.log", f"unknown sink '{name}'; choices: {', '.join(SINK_PACKAGES)}",
                              f"use run.log = {list(SINK_PACKAGES)} or a part of it")
        if names.count(name) > 1:
            raise ConfigError("run.log", f"'{name}' is listed {names.count(name)} times", "list each sink once")
        package = SINK_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError("run.log", f"the '{name}' sink needs the '{package}' package, which is not installed",
                              f"pip install fedsim[{name}]   (or: pip install {package}), or remove '{name}' "
                              "from run.log")
    return names


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, ``round`` and booleans excepted."""
    return {str(k): float(v) for k, v in metrics.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    """Scalars per round in ``RUN_DIR/tensorboard/`` (TensorBoard event files)."""

    name = "tensorboard"

    def open(self, run_dir: Path, scenario: Any, first_round: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=first_round if first_round > 0 else None)
        config = Path(run_dir) / "config.toml"
        if first_round == 0 and config.is_file():
            self.writer.add_text("scenario", "```toml\n" + config.read_text() + "\n```", global_step=0)

    def log(self, server_round: int, metrics: dict[str, Any]) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=server_round)
        self.writer.flush()

    def close(self, status: str = "completed") -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class MLflowSink:
    """One MLflow run per fedsim run: parameters = the scenario's keys, metrics per round (step = round)."""

    name = "mlflow"

    def open(self, run_dir: Path, scenario: Any, first_round: int = 0) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir) / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = str(scenario.run.name)
        found = self.client.get_experiment_by_name(experiment_name)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment_name)
        marker = Path(run_dir) / ".mlflow_run_id"
        if first_round > 0 and marker.is_file():  # a resumed run continues its MLflow run
            self.run_id = marker.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(experiment_id, run_name=Path(run_dir).name,
                                     tags={"fedsim.run_dir": str(Path(run_dir).resolve())})
        self.run_id = run.info.run_id
        marker.write_text(self.run_id)
        from mlflow.entities import Param

        params = [Param(key, str(value)[:500]) for key, value in _flat(scenario.to_dict()).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, server_round: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, server_round) for key, value in scalars(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str = "completed") -> None:
        ending = "FINISHED" if status == "completed" else "KILLED" if status == "interrupted" else "FAILED"
        self.client.set_tag(self.run_id, "fedsim.status", status)
        self.client.set_terminated(self.run_id, status=ending)


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif value is not None:
            out[f"{prefix}{key}"] = value
    return out


SINKS = {"tensorboard": TensorBoardSink, "mlflow": MLflowSink}


class Sinks:
    """The sinks of ``scenario.run.log`` for one run directory.

    Packages are checked when this is made (before the run writes anything); the sinks are opened at
    the first :meth:`log`, once the run directory holds its ``config.toml``. ``first_round`` is the
    first round a resumed run writes again (0 for a new run)."""

    def __init__(self, run_dir: str | Path, scenario: Any, first_round: int = 0) -> None:
        self.names = check_sinks(list(getattr(scenario.run, "log", []) or []))
        self.run_dir, self.scenario, self.first_round = Path(run_dir), scenario, first_round
        self.active: list[Any] | None = None

    def log(self, server_round: int, metrics: dict[str, Any]) -> None:
        if not self.names:
            return
        if self.active is None:
            self.active = []
            for name in self.names:
                sink = SINKS[name]()
                sink.open(self.run_dir, self.scenario, self.first_round)
                self.active.append(sink)
        for sink in self.active:
            sink.log(server_round, metrics)

    def close(self, status: str = "completed") -> None:
        for sink in self.active or []:
            sink.close(status)
        self.active = None
