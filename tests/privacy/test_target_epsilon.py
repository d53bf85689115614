"""privacy.target_epsilon: the noise multiplier calibrated inside the run, tight and never overshooting.

The planned total is recomputed here independently of the mechanisms' code: each client's DP-SGD plan
(Poisson rate batch/n, local steps) composed for every round with a fresh accountant, DP-FedAvg's
sampled Gaussian per round, DP-FTRL's ρ-zCDP, plus the released counters' ε.
"""

import json
import math

import pytest

from fedsim.catalog import resolve
from fedsim.config import load_scenario, scenario_from_dict
from fedsim.data.federation import federation_of
from fedsim.engines.local import run_local
from fedsim.errors import ConfigError
from fedsim.privacy.accountants import PoissonGaussianEvent, make_accountant
from fedsim.privacy.dp_ftrl import dp_ftrl_epsilon
from fedsim.privacy.ledger import released_counters
from fedsim.results import read_jsonl
from tests.conftest import TINY, tiny

DPSGD = ['privacy.mechanism="dp-sgd"', "privacy.release_counters=false"]
FEDAVG = ['privacy.mechanism="dp-fedavg"', 'strategy.name="dp_fedavg"', "strategy.fraction_train=0.5"]
FTRL = ['privacy.mechanism="dp-ftrl"', 'strategy.name="dp_ftrl"', "strategy.fraction_train=0.5"]


def _counters(s) -> float:
    return sum(c.epsilon(s.privacy.delta) for c in released_counters(s, int(federation_of(s).num_classes)))


def planned_dp_sgd(s, sigma: float) -> float:
    """The worst client's ε(δ) after every round, each client's plan derived here from its data size."""
    c, p, worst = s.client, s.privacy, 0.0
    for n in federation_of(s).client_sizes():
        q = min(1.0, c.batch_size / int(n))
        steps = min(c.epochs * max(1, round(1 / q)), c.max_steps or math.inf)
        acc = make_accountant(p.accountant)
        for _ in range(s.run.rounds):
            acc.compose(PoissonGaussianEvent(sigma, q), int(steps))
        worst = max(worst, acc.epsilon(p.delta))
    return worst + _counters(s)


def planned_dp_fedavg(s, sigma: float) -> float:
    acc = make_accountant(s.privacy.accountant)
    acc.compose(PoissonGaussianEvent(sigma, s.strategy.fraction_train), s.run.rounds)
    return acc.epsilon(s.privacy.delta) + _counters(s)


def planned_dp_ftrl(s, sigma: float) -> float:
    n = s.data.num_clients
    per_epoch = n // max(s.strategy.min_train_clients, int(s.strategy.fraction_train * n))
    return dp_ftrl_epsilon(sigma, per_epoch, math.ceil(s.run.rounds / per_epoch), s.privacy.delta) + _counters(s)


@pytest.mark.parametrize("sets, planned, target", [
    (DPSGD, planned_dp_sgd, 3.0),
    ([*DPSGD, 'data.partitioner="dirichlet"', "client.max_steps=0"], planned_dp_sgd, 5.0),  # clients of many sizes
    (FEDAVG, planned_dp_fedavg, 8.0),
    (FTRL, planned_dp_ftrl, 6.0),
], ids=["dp-sgd", "dp-sgd-skewed", "dp-fedavg", "dp-ftrl"])
def test_the_calibrated_noise_meets_the_target_tightly(sets, planned, target):
    s = tiny([*sets, f"privacy.target_epsilon={target}"])
    sigma = s.privacy.noise_multiplier
    assert sigma > 0 and s.privacy.target_epsilon == target
    assert planned(s, sigma) <= target                  # never overshoots
    assert planned(s, 0.99 * sigma) > target            # and is tight: 1 % less noise exceeds it


def test_a_run_with_a_target_ends_within_it_and_records_the_noise(tmp_path):
    s = tiny([*DPSGD, "privacy.release_counters=true", "privacy.target_epsilon=4"])
    sigma = s.privacy.noise_multiplier
    summary = run_local(s, tmp_path / "run")
    assert summary["status"] == "completed"
    assert 0 < summary["final"]["epsilon"] <= 4.0
    assert summary["privacy"] == {"mechanism": "dp-sgd", "noise_multiplier": sigma, "target_epsilon": 4.0}
    total = [r for r in read_jsonl(tmp_path / "run" / "privacy.jsonl") if r["mechanism"] == "total"]
    assert all(r["epsilon"] <= 4.0 and r["target_epsilon"] == 4.0 for r in total)
    sgd = [r for r in read_jsonl(tmp_path / "run" / "privacy.jsonl") if r["mechanism"] == "dp-sgd"]
    assert {r["noise_multiplier"] for r in sgd} == {sigma}
    clients = read_jsonl(tmp_path / "run" / "clients.jsonl")
    assert {c["dp_sgd/noise_multiplier"] for c in clients if c["status"] == "ok"} == {sigma}  # the clients used it
    again = resolve(load_scenario(tmp_path / "run" / "config.toml"))  # the run directory re-runs as it ran
    assert again.privacy.noise_multiplier == sigma and again.privacy.target_epsilon == 4.0


def test_noise_and_target_together_are_refused_naming_both():
    with pytest.raises(ConfigError) as ei:
        tiny([*FEDAVG, "privacy.noise_multiplier=1.0", "privacy.target_epsilon=8"])
    assert ei.value.key == "privacy.noise_multiplier" and "privacy.target_epsilon" in str(ei.value)


@pytest.mark.parametrize("sets, words", [
    ([*FEDAVG, "privacy.target_epsilon=9", "privacy.max_epsilon=8"], ["above the budget", "max_epsilon"]),
    ([*FEDAVG, "privacy.target_epsilon=0.5", "privacy.counter_noise=2"], ["counters alone"]),
    ([*DPSGD, "privacy.target_epsilon=1e-9"], ["unreachable"]),
    (["privacy.target_epsilon=8"], ["no effect without a mechanism"]),
])
def test_impossible_targets_are_refused_before_the_run(sets, words):
    with pytest.raises(ConfigError) as ei:
        tiny([*sets])
    assert ei.value.key == "privacy.target_epsilon", str(ei.value)
    for w in words:
        assert w in str(ei.value)


def test_calibration_does_not_change_a_scenario_without_target():
    raw = json.loads(json.dumps(TINY))
    raw["privacy"] = {"mechanism": "dp-fedavg", "noise_multiplier": 1.1}
    raw["strategy"]["name"] = "dp_fedavg"
    assert resolve(scenario_from_dict(raw)).privacy.noise_multiplier == 1.1
