"""The Python API (``fedsim.run`` → ``Run``), extensions outside the package (``module:object`` names,
decorators, entry points) and Flower's own strategies by name (``flwr:FedAvg``)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import fedsim
from fedsim.errors import ConfigError, FailedRoundError, FedSimError, RunDirectoryError
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]

PLUGIN_SOURCE = '''
from dataclasses import dataclass
from fedsim.clients.plugin_api import ClientPlugin, Event

CALLS = []

class Counter(ClientPlugin):
    """Counts its rounds and scales the loss (a measurable change of training)."""
    name = "counter"
    events = frozenset({Event.ROUND_START, Event.LOSS})

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        scale: float = 1.0

    def on(self, event, state):
        if event is Event.ROUND_START:
            CALLS.append((state.round, state.client_id))
        else:
            state.add_loss("scaled", (self.settings.scale - 1.0) * state.loss_terms["ce"])
'''


def _tiny(**tables) -> dict:
    raw = copy.deepcopy(TINY)
    for section, values in tables.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def _module(tmp_path: Path, monkeypatch, source: str) -> str:
    """Write ``source`` as a new module in ``tmp_path`` (put on sys.path) and return its name."""
    name = f"user_ext_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# ------------------------------------------------------------------------------------------ fedsim.run
def test_run_returns_the_rows_of_metrics_jsonl(tmp_path, capfd):
    run = fedsim.run(_tiny(), out=tmp_path / "r", overrides={"run.seed": 5}, run__rounds=2)
    assert "round 1/" not in capfd.readouterr().err  # no progress unless asked for
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert run.metrics == lines and [row["round"] for row in lines] == [0, 1, 2]
    assert run.status == "completed" and run.summary["seed"] == 5 and run.dir == tmp_path / "r"
    assert run.clients == [json.loads(x) for x in (tmp_path / "r" / "clients.jsonl").read_text().splitlines()]
    assert {c["client"] for c in run.clients} == set(range(4)) and run.scenario.run.seed == 5
    assert run.metrics[-1]["test_accuracy"] > run.metrics[0]["test_accuracy"]
    with pytest.raises(RunDirectoryError):  # the same out again: refused, the run is kept
        fedsim.run(_tiny(), out=tmp_path / "r")
    assert fedsim.load_run(tmp_path / "r").metrics == lines


def test_pandas_frame_or_a_typed_import_error(tmp_path):
    rows = [{"round": 0, "test_accuracy": 0.1}, {"round": 1, "test_accuracy": 0.5}]
    (tmp_path / "config.toml").write_text("")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = fedsim.load_run(tmp_path)
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(fedsim.MissingDependencyError, match="pandas") as err:
            run.frame
        assert isinstance(err.value, ImportError) and isinstance(err.value, FedSimError)
    else:
        assert run.frame.to_dict("records") == rows
    with pytest.raises(RunDirectoryError):
        fedsim.load_run(tmp_path / "nothing")


def test_overrides_dict_list_and_keywords():
    items = fedsim.api.override_items({"run.rounds": 2, "data.partition": {"alpha": 0.1}}, client__lr=0.5,
                                      client__plugins=["fedprox"], run__name="x y")
    assert items == ["run.rounds=2", "data.partition.alpha=0.1", "client.lr=0.5", 'client.plugins=["fedprox"]',
                     'run.name="x y"']
    assert fedsim.api.override_items(["run.rounds=3"]) == ["run.rounds=3"]
    with pytest.raises(ConfigError, match="section__key"):
        fedsim.api.override_items(rounds=3)
    with pytest.raises(ConfigError, match="None"):
        fedsim.api.override_items({"run.rounds": None})
    scen = fedsim.load_scenario("default.toml", {"run.rounds": 3}, strategy__name="fedprox")
    assert isinstance(scen, fedsim.Scenario) and scen.run.rounds == 3 and scen.strategy.name == "fedprox"
    again = fedsim.load_scenario(scen, run__rounds=4)  # a Scenario object, overridden: a new one
    assert again.run.rounds == 4 and scen.run.rounds == 3 and again.strategy.name == "fedprox"
    with pytest.raises(RunDirectoryError, match="out"):
        fedsim.run(_tiny(), overwrite=True)


def test_a_failed_run_raises_the_typed_error_with_its_run(tmp_path, capfd):
    with pytest.raises(FailedRoundError) as err:
        fedsim.run(_tiny(faults={"crash_clients": [0, 1, 2, 3]}), out=tmp_path / "r", progress=True,
                   run__progress=True)  # (TINY turns run.progress off, which wins, as in `fedsim run`)
    assert err.value.exit_code == 10 and err.value.run.status == "stopped: FailedRoundError"
    assert "round 1/2" in capfd.readouterr().err  # progress=True reports each round (a line, off a terminal)


def test_import_fedsim_stays_light():
    code = ("import sys, fedsim; heavy = [m for m in ('torch', 'flwr', 'pydantic', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy; assert {'run', 'Scenario', 'register_plugin'} <= set(dir(fedsim))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------------------------------ extensions
@pytest.mark.slow  # end to end: several runs
def test_a_plugin_from_a_user_module_runs_by_module_object_name(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch, PLUGIN_SOURCE)
    toml = tmp_path / "scenario.toml"
    toml.write_text(textwrap.dedent(f"""
        [run]
        rounds = 2
        seed = 3
        [data]
        num_clients = 4
        partitioner = "iid"
        [model]
        hidden = [16]
        [client]
        max_steps = 5
        lr = 0.1
        plugins = ["{mod}:Counter"]
        [client."{mod}:Counter"]
        scale = 3.0
        """))
    scaled = fedsim.run(toml, out=tmp_path / "scaled")
    calls = sys.modules[mod].CALLS
    assert sorted(calls) == [(r, c) for r in (1, 2) for c in range(4)]  # every client, every round
    neutral = fedsim.run(toml, out=tmp_path / "neutral", overrides={f"client.{mod}:Counter.scale": 1.0})
    plain = fedsim.run(_tiny(), out=tmp_path / "plain")  # the same scenario without the plugin
    assert neutral.metrics[-1]["test_loss"] == pytest.approx(plain.metrics[-1]["test_loss"], rel=1e-9)
    assert abs(scaled.metrics[-1]["test_loss"] - plain.metrics[-1]["test_loss"]) > 1e-3  # its setting's effect


def test_decorators_register_in_the_shared_registries(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch, """
        import fedsim
        from torch import nn
        from fedsim.strategies.base import FedSimStrategy
        from fedsim.strategies.fedavg_math import weighted_mean

        @fedsim.register_model("tiny_linear_api")
        def tiny_linear(cfg, input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

        @fedsim.register_strategy("half_step_api")
        class HalfStep(FedSimStrategy):
            def aggregate(self, server_round, updates):
                mean = weighted_mean([u.arrays for u in updates], [u.num_examples for u in updates])
                return [g + 0.5 * (m - g) for g, m in zip(self.current, mean)]
        """)
    from fedsim.models import MODELS
    from fedsim.strategies.base import STRATEGIES

    for registry in (MODELS, STRATEGIES):  # put back after the test: other tests iterate the registries
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    __import__(mod)
    assert "tiny_linear_api" in MODELS and STRATEGIES.get("half_step_api").name == "half_step_api"
    __import__("importlib").reload(sys.modules[mod])  # a re-run notebook cell replaces its definition
    scen = fedsim.load_scenario(_tiny(strategy={"name": "half_step_api"}))
    assert scen.strategy.name == "half_step_api"


@pytest.mark.parametrize(("table", "value", "key", "message"), [
    ("client", {"plugins": ["no_such_module_zz:Thing"]}, "client.plugins", "cannot be imported"),
    ("client", {"plugins": ["math:nothing_here"]}, "client.plugins", "has no object"),
    ("client", {"plugins": ["math:pi"]}, "client.plugins", "not a plugin"),
    ("client", {"plugins": ["math:"]}, "client.plugins", "not a valid"),
    ("strategy", {"name": "os:path"}, "strategy.name", "is a module, not a strategy"),
    ("strategy", {"name": "flwr:FedProx"}, "strategy.name", "proximal"),
    ("strategy", {"name": "flwr:QFedAvg"}, "strategy.name", "client_learning_rate"),
    ("strategy", {"name": "flwr:NoSuchStrategy"}, "strategy.name", "has no object"),
    ("model", {"name": "math:pi"}, "model.name", "must be callable"),
    ("data", {"dataset": "math:tau"}, "data.dataset", "not a dataset"),
])
def test_a_bad_module_object_name_is_a_typed_error_naming_the_key(table, value, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        fedsim.load_scenario(_tiny(**{table: value}))
    assert err.value.key == key


def test_a_plain_loader_named_module_object_gets_the_registered_checks(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch, """
        import numpy as np
        from fedsim.data.datasets import Dataset

        def blobs(seed, test_fraction, size=40):
            rng = np.random.default_rng(seed)
            y = np.arange(size) % 2
            x = (rng.normal(size=(size, 3)) + y[:, None]).astype("float32")
            return Dataset(x[:30], y[:30], x[30:], y[30:], 2, (3,), "blobs")
        """)
    from fedsim.data.datasets import DATASETS, load_dataset

    assert load_dataset(f"{mod}:blobs", 0, 0.2, {"size": 50}).num_train == 30
    with pytest.raises(ConfigError) as err:
        load_dataset(f"{mod}:blobs", 0, 0.2, {"sizes": 50})
    assert err.value.key == "data.options.sizes"
    assert not any(":" in n for n in DATASETS.names())  # never listed by `fedsim list`


def test_entry_points_register_extensions(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch, """
        from torch import nn

        def wide(cfg, input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        """)
    dist = tmp_path / "fedsim_ext_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fedsim-ext-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fedsim.models]\nwide_ep = {mod}:wide\n"
                                           "[fedsim.strategies]\nmedian_ep = flwr.serverapp.strategy:FedMedian\n")
    from fedsim.models import MODELS
    from fedsim.strategies.base import STRATEGIES

    fedsim.load_scenario("default.toml")  # the catalog filled every registry before the package was installed
    for registry in (MODELS, STRATEGIES):
        monkeypatch.setattr(registry, "_entry_points_loaded", False)
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    assert MODELS.get("wide_ep") is sys.modules[mod].wide
    assert STRATEGIES.get("median_ep").flower_class.__name__ == "FedMedian"


# ------------------------------------------------------------------------------------------ Flower's strategies
@pytest.mark.slow  # end to end: several runs
def test_flower_fedavg_runs_with_fedsim_clients_like_fedsim_fedavg(tmp_path):
    flower = fedsim.run(_tiny(strategy={"name": "flwr:FedAvg"}), out=tmp_path / "flwr")
    ours = fedsim.run(_tiny(), out=tmp_path / "ours")
    acc = [row["test_accuracy"] for row in flower.metrics]
    assert flower.status == "completed" and len(acc) == 3 and acc[-1] > acc[0] + 0.05
    assert flower.metrics[-1]["test_loss"] == pytest.approx(ours.metrics[-1]["test_loss"], rel=1e-5)
    assert flower.metrics[-1]["num-clients"] == 4 and flower.summary["strategy"] == "flwr:FedAvg"


@pytest.mark.slow  # end to end: several runs
def test_flower_strategy_options_sampling_and_resume(tmp_path):
    with pytest.raises(ConfigError, match="eta_l") as err:
        fedsim.load_scenario(_tiny(strategy={"name": "flwr:FedAdam", "eta_l": 0.1}))
    assert err.value.key == "strategy.eta_l"
    with pytest.raises(ConfigError, match="expected a number"):
        fedsim.load_scenario(_tiny(strategy={"name": "flwr:FedAdam", "eta": "big"}))
    half = _tiny(strategy={"name": "flwr:FedAdam", "eta": 0.05, "fraction_train": 0.5}, run={"rounds": 1})
    a, b = (fedsim.run(half, out=tmp_path / n) for n in ("a", "b"))
    picked = [sorted(c["client"] for c in run.clients if c["status"] == "ok") for run in (a, b)]
    assert picked[0] == picked[1] and len(picked[0]) == 2  # Flower's sample, drawn from the root seed
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in a.metrics] == \
        [{k: v for k, v in r.items() if k != "wall_s"} for r in b.metrics]
    from fedsim.catalog import registries
    from fedsim.errors import CheckpointError

    strategy = registries()["strategies"].get("flwr:FedAdam")(fedsim.load_scenario(half))
    assert strategy.inner.eta == 0.05 and strategy.inner.min_train_nodes == 2
    with pytest.raises(CheckpointError, match="Flower"):
        strategy.load_state_dict({})


# ------------------------------------------------------------------------------------------ README
@pytest.mark.slow
def test_the_readme_python_api_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's Python API section has no python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_plugins.py").write_text(blocks[0])
    namespace: dict = {}
    exec(compile(blocks[1], "README.md (Python API)", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["run"].status == "completed"


def test_run_takes_the_clients_app_by_name_or_as_an_object(tmp_path):
    """``fedsim.run(..., client_app=)``: a ``module:object`` name is ``run.client_app`` (recorded in the run's
    config and summary); a ClientApp object serves the local engine and is recorded as such."""
    from tests.fedsim.engines.vanilla_app import build_vanilla_app

    named = "tests.fedsim.engines.vanilla_app:named_app"
    run = fedsim.run(_tiny(), out=tmp_path / "named", client_app=named)
    assert run.status == "completed" and run.summary["client_app"] == named and run.scenario.run.client_app == named
    seen: list = []
    run = fedsim.run(_tiny(), out=tmp_path / "object", client_app=build_vanilla_app(seen))
    assert run.summary["client_app"] == "python object (flwr.clientapp.client_app.ClientApp)"
    assert {t for t, _ in seen} == {"train"} and len(seen) == 8  # 2 rounds x 4 clients, all through it
    with pytest.raises(ConfigError, match="cannot reach the deployment") as err:
        fedsim.run(_tiny(), out=tmp_path / "deploy", client_app=build_vanilla_app(), run__engine="deploy")
    assert err.value.key == "client_app" and not (tmp_path / "deploy").exists()
    with pytest.raises(ConfigError, match="ClientApp"):
        fedsim.run(_tiny(), out=tmp_path / "x", client_app=42)
