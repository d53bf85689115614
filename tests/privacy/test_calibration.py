"""Calibration: never overshoots, agrees with Opacus, refuses unreachable targets with a typed error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.utils import get_noise_multiplier

from fedsim.errors import ConfigError
from fedsim.privacy.calibration import calibrate_noise_multiplier, epsilon_for


@settings(max_examples=8, deadline=None)
@given(
    target=st.floats(1.0, 10.0),
    q=st.floats(1e-3, 0.1),
    steps=st.integers(10, 1000),
    delta=st.sampled_from([1e-4, 1e-5, 1e-6]),
)
def test_no_overshoot(target, q, steps, delta):
    result = calibrate_noise_multiplier(target, delta, q, steps, "rdp")
    assert result.epsilon <= target
    # recomputed from scratch, not trusted from the search
    assert epsilon_for(result.noise_multiplier, q, steps, delta, "rdp") <= target
    # and tight: 5 % less noise exceeds the target
    assert epsilon_for(result.noise_multiplier * 0.95, q, steps, delta, "rdp") > target


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_agrees_with_opacus_get_noise_multiplier():
    ours = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 5000, "rdp").noise_multiplier
    theirs = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=5000,
                                  accountant="rdp")
    assert ours == pytest.approx(theirs, rel=5e-3)


def test_pld_and_zcdp_calibration():
    pld = calibrate_noise_multiplier(2.0, 1e-5, 0.05, 200, "pld")
    assert pld.epsilon <= 2.0
    assert pld.noise_multiplier < calibrate_noise_multiplier(2.0, 1e-5, 0.05, 200, "rdp").noise_multiplier
    z = calibrate_noise_multiplier(4.7284, 1e-5, 1.0, 1, "zcdp")  # rho = 0.5 <-> z = 1
    assert z.noise_multiplier == pytest.approx(1.0, rel=1e-3) and z.epsilon <= 4.7284


def test_unreachable_and_invalid_targets_are_typed():
    with pytest.raises(ConfigError, match="unreachable"):
        calibrate_noise_multiplier(1e-9, 1e-5, 1.0, 10**6, "zcdp")
    with pytest.raises(ConfigError, match="target_epsilon"):
        calibrate_noise_multiplier(-1.0, 1e-5, 0.1, 10)
    with pytest.raises(ConfigError, match="steps"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.1, 0)
    with pytest.raises(ConfigError, match="subsampling"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.1, 10, "zcdp")


def test_huge_target_returns_the_noise_floor():
    result = calibrate_noise_multiplier(1e6, 1e-5, 0.01, 10, "rdp")
    assert result.noise_multiplier < 0.01 and result.epsilon <= 1e6
