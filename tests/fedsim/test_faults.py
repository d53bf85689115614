"""The fault model (``fedsim.faults``): attacks do what they say, honest clients pass through."""

import numpy as np
import pytest

from fedsim import faults
from fedsim.errors import ClientFailure
from tests.conftest import tiny


def _weights(rng):
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "n": np.array([5], dtype=np.int64)}


@pytest.mark.parametrize("attack", faults.ATTACKS)
def test_byzantine_weights_attacks(attack):
    s = tiny(["faults.byzantine_clients=[1]", f'faults.attack="{attack}"'])
    rng = np.random.default_rng(0)
    w, g = _weights(rng), _weights(rng)
    honest = faults.attack_weights(s, 2, 0, w, g)
    assert honest is w
    bad = faults.attack_weights(s, 2, 1, w, g)
    np.testing.assert_array_equal(bad["n"], w["n"])  # integer buffers pass unchanged
    if attack == "sign_flip":
        np.testing.assert_array_equal(bad["w"], g["w"] - (w["w"] - g["w"]))
    elif attack == "gaussian":
        assert not np.allclose(bad["w"], g["w"]) and np.isfinite(bad["w"]).all()
        again = faults.attack_weights(s, 2, 1, w, g)
        np.testing.assert_array_equal(bad["w"], again["w"])  # seeded per (round, client)
    else:
        assert np.isnan(bad["w"]).all()


@pytest.mark.parametrize("attack", faults.ATTACKS)
def test_byzantine_gradient_attacks(attack):
    s = tiny(["faults.byzantine_clients=[1]", f'faults.attack="{attack}"'])
    g = np.arange(4.0)
    assert faults.attack_gradient(s, 1, 0, g) is g
    bad = faults.attack_gradient(s, 1, 1, g)
    if attack == "sign_flip":
        np.testing.assert_array_equal(bad, -g)
    elif attack == "gaussian":
        assert bad.shape == g.shape and not np.array_equal(bad, g)
    else:
        assert np.isnan(bad).all()


def test_crashes_and_dropouts_are_seeded_failures():
    s = tiny(["faults.crash_clients=[2]", "faults.crash_rounds=[3]", "faults.dropout=0.5"])
    with pytest.raises(faults.InjectedCrash):
        faults.inject_failure(s, 3, 2)
    outcomes = []
    for rnd in range(1, 30):
        try:
            faults.inject_failure(s, rnd, 0)
            outcomes.append(False)
        except ClientFailure:
            outcomes.append(True)
    assert 0 < sum(outcomes) < len(outcomes)


def test_straggler_time_is_steps_times_slowdown():
    s = tiny(["faults.stragglers=1.0", "faults.straggler_slowdown=4.0"])
    assert faults.simulated_time(s, 1, 0, 10) == 40.0
    assert faults.simulated_time(tiny(), 1, 0, 10) == 10.0
