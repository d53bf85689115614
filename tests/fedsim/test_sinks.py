"""Tracking sinks (``[run] log``): TensorBoard event files and MLflow runs hold every round's metrics and ε
as ``metrics.jsonl`` has them; a missing package or an unknown sink is refused before anything is written."""

import importlib.machinery
import importlib.util
import sys
import types

import pytest

from fedsim.config import scenario_from_dict
from fedsim.engines.local import run_local
from fedsim.errors import ConfigError
from fedsim.results import read_jsonl
from tests.conftest import TINY, tiny

#: a private tiny run (DP-FedAvg, server-side noise: no Opacus), so ε is among the metrics
PRIVATE = ['strategy.name="dp_fedavg"', 'privacy.mechanism="dp-fedavg"', "privacy.noise_multiplier=1.0",
           'privacy.client_sampling="fixed"', "run.rounds=3"]


def _interrupt_at(round_no):
    def on_round(rnd, row):
        if rnd == round_no:
            raise KeyboardInterrupt("test")
    return on_round


@pytest.mark.slow  # end to end: a private run interrupted and resumed
def test_tensorboard_event_files_hold_each_round_and_epsilon(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install fedsim[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scen = tiny([*PRIVATE, 'run.log=["tensorboard"]', "run.rounds=4", "run.checkpoint_every=2"])
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # interrupted after round 3, whose checkpoint is round 2 ...
        run_local(scen, out, on_round=_interrupt_at(3))
    run_local(scen, out, resume=True)  # ... and resumed: round 3 is redone, every round appears once
    rows = read_jsonl(out / "metrics.jsonl")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"test_accuracy", "test_loss", "epsilon"} <= tags
    for key in ("test_accuracy", "test_loss", "epsilon"):
        events = acc.Scalars(key)
        expect = [(r["round"], r[key]) for r in rows if key in r]
        assert [e.step for e in events] == [step for step, _ in expect], key
        assert [e.value for e in events] == pytest.approx([v for _, v in expect], rel=1e-6), key
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["epsilon"] > rows[1]["epsilon"] > 0


def test_plain_run_writes_no_sink_files(tmp_path):
    run_local(tiny(["run.rounds=1"]), tmp_path / "run")
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "mlruns").exists()


@pytest.mark.parametrize("sink", ["tensorboard", "mlflow"])
def test_missing_package_refused_before_anything_is_written(tmp_path, monkeypatch, sink):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == sink else real(name, *a))
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run_local(tiny([f'run.log=["{sink}"]']), out)
    assert err.value.key == "run.log" and f"pip install fedsim[{sink}]" in err.value.hint
    assert not (out / "config.toml").exists() and not (out / "metrics.jsonl").exists()


def test_unknown_and_repeated_sinks_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        scenario_from_dict({**TINY, "run": {**TINY["run"], "log": ["wandb"]}})
    assert err.value.key.startswith("run.log") and "tensorboard" in str(err.value)
    with pytest.raises(ConfigError, match="listed 2 times"):
        run_local(tiny(['run.log=["tensorboard", "tensorboard"]']), tmp_path / "run")


class _FakeClient:
    """Records what the MLflow sink asks of ``mlflow.tracking.MlflowClient``."""

    calls: list = []

    def __init__(self, tracking_uri):
        self.calls.append(("uri", tracking_uri))

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        self.calls.append(("experiment", name))
        return "7"

    def create_run(self, experiment_id, run_name, tags):
        self.calls.append(("run", experiment_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

    def log_batch(self, run_id, metrics=(), params=()):
        self.calls += [("metric", m.key, m.value, m.step) for m in metrics]
        self.calls += [("param", p.key, p.value) for p in params]

    def set_tag(self, run_id, key, value):
        self.calls.append(("tag", key, value))

    def set_terminated(self, run_id, status):
        self.calls.append(("end", status))


def _fake_mlflow(monkeypatch):
    """A stand-in ``mlflow`` package (the real one is a large optional extra)."""
    root, tracking, entities = (types.ModuleType(n) for n in ("mlflow", "mlflow.tracking", "mlflow.entities"))
    root.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    tracking.MlflowClient = _FakeClient
    entities.Metric = lambda key, value, timestamp, step: types.SimpleNamespace(key=key, value=value, step=step)
    entities.Param = lambda key, value: types.SimpleNamespace(key=key, value=value)
    for name, mod in (("mlflow", root), ("mlflow.tracking", tracking), ("mlflow.entities", entities)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _FakeClient.calls = []


def test_mlflow_sink_logs_params_metrics_and_ending(tmp_path, monkeypatch):
    _fake_mlflow(monkeypatch)
    out = tmp_path / "run"
    run_local(tiny([*PRIVATE, 'run.log=["mlflow"]']), out)
    calls = _FakeClient.calls
    assert calls[0] == ("uri", (out / "mlruns").resolve().as_uri())
    assert ("experiment", "tiny") in calls and ("run", "7", "run") in calls
    assert ("param", "run.rounds", "3") in calls and ("param", "privacy.mechanism", "dp-fedavg") in calls
    rows = read_jsonl(out / "metrics.jsonl")
    for key in ("test_accuracy", "epsilon"):
        assert [(c[3], c[2]) for c in calls if c[:2] == ("metric", key)] == [(r["round"], r[key]) for r in rows
                                                                             if key in r]
    assert calls[-2:] == [("tag", "fedsim.status", "completed"), ("end", "FINISHED")]


def test_real_mlflow_file_store(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install fedsim[mlflow])")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    run_local(tiny(['run.log=["mlflow"]']), out)
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = (out / ".mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "test_accuracy")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["test_accuracy"]) for r in rows]
    assert client.get_run(run_id).info.status == "FINISHED"
