"""Privacy soundness end to end: one source of truth for every privacy parameter, the server checks
what it accounts, sampling is what is accounted, the report is the ledger's per-client view."""

import json
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from scipy import stats

from fedsim.engines.local import run_local
from fedsim.errors import ConfigError
from fedsim.results import read_jsonl
from tests.conftest import tiny

DPSGD = ['privacy.mechanism="dp-sgd"', "privacy.noise_multiplier=1.1", "privacy.clip_norm=1.0",
         "run.rounds=2", "privacy.release_counters=false"]


# ---------------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("overrides, key", [
    (['client.plugins=["dp_sgd"]', "client.dp_sgd.noise_multiplier=0.3"], "client.dp_sgd.noise_multiplier"),
    (['client.plugins=["dp_sgd"]', "client.dp_sgd.clip_norm=100.0"], "client.dp_sgd.clip_norm"),
    (['client.plugins=["dp_sgd"]', "client.dp_sgd.sample_rate=0.01"], "client.dp_sgd.sample_rate"),
    (['client.plugins=["dp_sgd"]', "client.dp_sgd.poisson=false"], "client.dp_sgd.poisson"),
])
def test_plugin_tables_cannot_change_privacy_parameters(overrides, key):
    with pytest.raises(ConfigError) as info:
        tiny([*DPSGD, *overrides])
    assert info.value.key == key


def test_dp_sgd_plugin_without_the_mechanism_is_refused():
    with pytest.raises(ConfigError) as info:
        tiny(['client.plugins=["dp_sgd"]'])
    assert info.value.key == "client.plugins"


@pytest.mark.parametrize("key", ["privacy.noise_multiplier=1.0", "privacy.max_epsilon=3.0"])
def test_privacy_keys_without_a_mechanism_are_refused(key):
    with pytest.raises(ConfigError) as info:
        tiny([key])
    assert info.value.key == key.split("=")[0]


@pytest.mark.parametrize("strategy", ["semifl", "signsgd", "coded_gd", "fedld"])
def test_dp_sgd_with_a_strategy_that_bypasses_the_private_loop_is_refused(strategy):
    with pytest.raises(ConfigError):
        tiny([*DPSGD, f'strategy.name="{strategy}"', "data.server_labelled=40"])


def test_strategy_options_cannot_carry_privacy_parameters():
    with pytest.raises(ConfigError):
        tiny([*DPSGD, "strategy.noise_multiplier=0.1"])


def test_the_bypass_command_is_refused_before_the_run(tmp_path):
    """The issue's command: exit 2 with the key named, and no run directory."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "scenarios/dp_sgd_digits.toml", "--set", "run.rounds=3",
           "--set", 'client.plugins=["dp_sgd"]', "--set", "client.dp_sgd.noise_multiplier=0.3", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "client.dp_sgd.noise_multiplier" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("steps_key", ["client.max_steps=2", "client.epochs=2"])
def test_local_step_settings_are_accounted_as_run(tmp_path, steps_key):
    run_local(tiny([*DPSGD, steps_key, "run.rounds=1"]), tmp_path)
    clients = [c for c in read_jsonl(tmp_path / "clients.jsonl") if c["status"] == "ok"]
    assert clients
    rec = [r for r in read_jsonl(tmp_path / "privacy.jsonl") if r["mechanism"] == "dp-sgd"][-1]
    for c in clients:  # the ledger's per-client ε equals the client's own accountant on the same steps
        assert rec["clients"][str(c["client"])] == pytest.approx(c["dp_sgd/epsilon"], rel=1e-9)


# ---------------------------------------------------------------------------------------------- 2
def _dp_sgd_strategy():
    from fedsim.server import ServerRuntime
    from fedsim.strategies.base import make_strategy

    s = tiny(DPSGD)
    strategy = make_strategy(s)
    strategy.attach_server(ServerRuntime(s))
    return s, strategy


def _reply(strategy, sent, metrics):
    from fedsim.wire import from_numpy

    arrays = ArrayRecord({k: from_numpy(a) for k, a in zip(strategy.keys, strategy.current)})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=sent)


@pytest.mark.parametrize("field, value", [("dp_sgd/noise_multiplier", 0.3), ("dp_sgd/steps", 1.0),
                                          ("dp_sgd/sample_rate", 0.5), ("dp_sgd/clip_norm", 50.0),
                                          ("dp_sgd/poisson", 0), ("dp_sgd/noise_multiplier", None)])
def test_a_tampered_private_reply_is_rejected_and_recorded(field, value):
    from fedsim.engines.local import node_id_for
    from fedsim.strategies.base import ClientUpdate  # noqa: F401  (the shape of what collect returns)
    from fedsim.wire import from_numpy

    s, strategy = _dp_sgd_strategy()
    rng = np.random.default_rng(0)
    model = strategy.mechanisms[0]
    keys = ["w", "b"]
    strategy.set_global(ArrayRecord({"w": from_numpy(rng.normal(size=(2, 2)).astype(np.float32)),
                                     "b": from_numpy(np.zeros(2, np.float32))}))
    assert keys == strategy.keys
    sent = [Message(RecordDict({}), dst_node_id=node_id_for(p), message_type="train") for p in (0, 1)]
    for p, m in zip((0, 1), sent):
        m.metadata.__dict__["_message_id"] = f"train-{p}"  # what the grid does on push
    strategy._sent = sent
    strategy.directory = {node_id_for(p): p for p in (0, 1)}

    def honest(pid):
        q, steps = model.plan[pid]
        return {"partition-id": pid, "num-examples": 10, "dp_sgd/noise_multiplier": 1.1, "dp_sgd/clip_norm": 1.0,
                "dp_sgd/sample_rate": q, "dp_sgd/steps": float(steps), "dp_sgd/poisson": 1, "dp_sgd/epsilon": 1.0}

    bad = honest(0)
    if value is None:
        del bad[field]
    else:
        bad[field] = value
    updates = strategy.collect(1, [_reply(strategy, sent[0], bad), _reply(strategy, sent[1], honest(1))])
    assert [u.partition_id for u in updates] == [1]
    (failure,) = strategy.failures
    assert failure.partition_id == 0 and failure.kind == "invalid" and field in failure.reason


def test_the_ledger_accounts_what_it_planned_not_what_a_client_claims(tmp_path):
    run_local(tiny(DPSGD), tmp_path)
    rec = [r for r in read_jsonl(tmp_path / "privacy.jsonl") if r["mechanism"] == "dp-sgd"]
    assert [r["round"] for r in rec] == [1, 2]
    worst = rec[-1]
    assert worst["epsilon"] == max(worst["clients"].values())
    assert worst["clients"][str(worst["worst_client"])] == worst["epsilon"]
    row = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert row["epsilon/dp-sgd/worst_client"] == worst["epsilon"]  # the summary reports the worst client, named as such
    assert "dp_sgd/epsilon" not in row  # no example-weighted mean of client claims
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["epsilon/dp-sgd/worst_client"] == worst["epsilon"]


# ---------------------------------------------------------------------------------------------- 3
def test_dp_sgd_batches_are_poisson_with_the_accounted_rate():
    """Realised batch sizes of the real plugin loop against Binomial(n, q)."""
    import torch

    from fedsim.clients.plugin_api import build_plugins
    from fedsim.clients.tasks import dp_sgd_settings
    from fedsim.clients.trainer import train_local
    from fedsim.models import build_model

    s = tiny([*DPSGD, "client.batch_size=8", "client.epochs=40", "client.max_steps=0"])
    n, q = 64, 8 / 64
    torch.manual_seed(0)
    x, y = torch.randn(n, 64), torch.randint(0, 10, (n,))
    model = build_model(s.model, (64,), 10, 0)
    sizes = []
    stack = build_plugins(["dp_sgd"], lambda _: dp_sgd_settings(s))
    original = stack.plugins[0]._after_step

    def spy(state):
        sizes.append(int(state.batch[1].shape[0]))
        original(state)

    stack.plugins[0]._after_step = spy
    res = train_local(model, x, y, s.client, stack, round=1, client_id=0, seed=0,
                      rng=torch.Generator().manual_seed(1), config={}, progress=0.0)
    assert res.metrics["dp_sgd/sample_rate"] == q
    sizes = np.asarray(sizes)
    assert len(sizes) == 40 * 8
    # mean and variance of Binomial(64, 1/8), and a chi-square goodness of fit on the counts
    z = (sizes.mean() - n * q) / np.sqrt(n * q * (1 - q) / len(sizes))
    assert abs(z) < 4
    assert 0.6 < sizes.var() / (n * q * (1 - q)) < 1.5
    observed = np.bincount(np.clip(sizes, 3, 13) - 3, minlength=11)
    expected = np.array([stats.binom.cdf(3, n, q)] + [stats.binom.pmf(k, n, q) for k in range(4, 13)]
                        + [stats.binom.sf(12, n, q)]) * len(sizes)
    assert stats.chisquare(observed, expected).pvalue > 1e-4


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_dp_fedavg_cohorts_are_sampled_as_accounted(sampling):
    from fedsim.engines.local import node_id_for
    from fedsim.strategies.base import make_strategy

    s = tiny(['strategy.name="dp_fedavg"', 'privacy.mechanism="dp-fedavg"', "privacy.noise_multiplier=1.0",
              "strategy.fraction_train=0.3", "data.num_clients=20", f'privacy.client_sampling="{sampling}"'])
    strategy = make_strategy(s)

    class Grid:
        node_partitions = {node_id_for(p): p for p in range(20)}

        def get_node_ids(self):
            return list(self.node_partitions)

    sizes = np.array([len(strategy.sample(r, Grid())) for r in range(1, 601)])
    event = strategy.mechanism.event
    if sampling == "fixed":
        assert set(sizes) == {event.sample_size}
        return
    n, q = 20, event.sample_rate
    z = (sizes.mean() - n * q) / np.sqrt(n * q * (1 - q) / len(sizes))
    assert abs(z) < 4
    assert 0.7 < sizes.var() / (n * q * (1 - q)) < 1.4
