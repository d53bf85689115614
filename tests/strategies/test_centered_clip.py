"""The centered_clip strategy: the mean without attackers, state that resumes exactly, robust in a run."""

import numpy as np
import pytest

from fedsim.catalog import resolve
from fedsim.config import scenario_from_dict
from fedsim.errors import ConfigError
from fedsim.strategies.base import ClientUpdate
from fedsim.strategies.centered_clip import CenteredClip
from tests.conftest import tiny


def _strategy(*sets):
    s = tiny(['strategy.name="centered_clip"', *sets])
    strat = CenteredClip(s)
    strat.keys = ["w", "n"]
    strat.current = [np.zeros((2, 2), np.float32), np.array([4], np.int64)]
    return strat


def _ups(rng, m=5):
    return [ClientUpdate(p, p, [rng.normal(size=(2, 2)).astype(np.float32), np.array([p], np.int64)], 1 + p, {}, None)
            for p in range(m)]


def test_large_radius_is_the_unweighted_mean_and_integers_are_averaged():
    strat = _strategy("strategy.tau=1000.0")
    ups = _ups(np.random.default_rng(0))
    new = strat.aggregate(1, ups)
    np.testing.assert_allclose(new[0], np.mean([u.arrays[0] for u in ups], axis=0), atol=1e-6)
    assert new[0].dtype == np.float32 and new[1].tolist() == [2]
    assert strat.train_metrics(ups)["cc-clipped-fraction"] == 0.0


def test_small_radius_bounds_one_outlier():
    strat = _strategy("strategy.tau=0.5")
    ups = _ups(np.random.default_rng(1))
    ups[0].arrays[0] = np.full((2, 2), 1e6, np.float32)
    new = strat.aggregate(1, ups)
    assert np.linalg.norm(new[0]) <= 0.5 + 1e-6  # every clipped difference from v0 = 0 has norm <= τ


def test_state_dict_resumes_exactly():
    rng = np.random.default_rng(2)
    r1, r2 = _ups(rng), _ups(rng)
    a = _strategy("strategy.tau=0.3", "strategy.iterations=2")
    a.current = [a.aggregate(1, r1)[0], a.current[1]]
    b = _strategy("strategy.tau=0.3", "strategy.iterations=2")
    b.current = list(a.current)
    b.load_state_dict({k: np.array(v) for k, v in a.state_dict().items()})
    np.testing.assert_array_equal(a.aggregate(2, r2)[0], b.aggregate(2, r2)[0])
    fresh = _strategy("strategy.tau=0.3", "strategy.iterations=2")  # without the history: another result
    fresh.current = list(a.current)
    assert not np.array_equal(fresh.aggregate(2, r2)[0], b.aggregate(2, r2)[0])


def test_bucketing_is_seeded_and_changes_the_result():
    ups = _ups(np.random.default_rng(3), m=6)
    one = _strategy("strategy.tau=0.5").aggregate(1, ups)[0]
    a = _strategy("strategy.tau=0.5", "strategy.bucket_size=2").aggregate(1, ups)[0]
    b = _strategy("strategy.tau=0.5", "strategy.bucket_size=2").aggregate(1, ups)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, one)


@pytest.mark.parametrize("key, value", [("tau", 0.0), ("tau", -1.0), ("iterations", 0), ("bucket_size", 0)])
def test_bad_options_are_refused(key, value):
    with pytest.raises(ConfigError) as ei:
        resolve(scenario_from_dict({"strategy": {"name": "centered_clip", key: value}}))
    assert ei.value.key.startswith("strategy")


@pytest.mark.slow
def test_centered_clip_resists_what_breaks_fedavg(tmp_path):
    from fedsim.engines.local import run_local

    attack = ["data.num_clients=6", "strategy.min_train_clients=6", "run.rounds=3", "faults.byzantine_clients=[0]",
              'faults.attack="gaussian"', "faults.attack_strength=3.0"]
    acc = {}
    for name, extra in [("clean", ['strategy.name="fedavg"']), ("fedavg", ['strategy.name="fedavg"', *attack]),
                        ("cc", ['strategy.name="centered_clip"', *attack])]:
        sets = extra if name != "clean" else [*extra, "data.num_clients=6", "strategy.min_train_clients=6",
                                               "run.rounds=3"]
        acc[name] = run_local(tiny(sets), tmp_path / name)["final"]["test_accuracy"]
    assert acc["fedavg"] < acc["clean"] - 0.2, acc
    assert acc["cc"] > acc["clean"] - 0.1, acc
