"""Canary audit (reliability.md §3, D5/D6): sound on the real mechanism, catches a noise/3 bug."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.errors import ConfigError
from fedsim.privacy.analysis import gaussian_epsilon_exact
from fedsim.privacy.audit import (
    audit_scores,
    client_level_gaussian_audit,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_from_rates,
)
from fedsim.privacy.clipping import dp_fedavg_aggregate


def noise_divided_by_3(updates, clip_norm, noise_multiplier, rng, **kwargs):
    return dp_fedavg_aggregate(updates, clip_norm, noise_multiplier / 3, rng, **kwargs)


@pytest.mark.parametrize("seed", [0, 1])
def test_audit_is_sound_and_detects_a_planted_bug(seed):
    claimed = gaussian_epsilon_exact(1.0, 1e-5)  # z = 1: 4.38
    sound = client_level_gaussian_audit(1.0, trials=8000, seed=seed)
    assert sound.claimed_epsilon == pytest.approx(claimed)
    assert not sound.violated and 0 < sound.epsilon_lower_bound < claimed
    buggy = client_level_gaussian_audit(1.0, trials=8000, seed=seed, aggregate=noise_divided_by_3,
                                        claimed_epsilon=claimed)
    assert buggy.violated, buggy


def test_clopper_pearson_bounds():
    assert clopper_pearson_lower(0, 100, 0.025) == 0.0
    assert clopper_pearson_upper(100, 100, 0.025) == 1.0
    # zero successes of n: upper = 1 - alpha^(1/n)
    assert clopper_pearson_upper(0, 1000, 0.05) == pytest.approx(1 - 0.05 ** (1 / 1000))
    lo, hi = clopper_pearson_lower(30, 100, 0.025), clopper_pearson_upper(30, 100, 0.025)
    assert lo < 0.3 < hi


def test_epsilon_from_rates_both_directions_and_floor():
    assert epsilon_from_rates(0.5, 0.01, 0.0) == pytest.approx(np.log(50))
    assert epsilon_from_rates(0.99, 0.5, 0.0) == pytest.approx(np.log(0.5 / 0.01))
    assert epsilon_from_rates(0.1, 0.5, 1e-5) == 0.0


def test_identical_distributions_give_no_evidence():
    rng = np.random.default_rng(0)
    result = audit_scores(rng.normal(size=4000), rng.normal(size=4000), delta=1e-5, claimed_epsilon=0.5)
    assert result.epsilon_lower_bound < 0.5 and not result.violated
    with pytest.raises(ConfigError):
        audit_scores([1.0] * 5, [0.0] * 5, delta=1e-5, claimed_epsilon=1.0)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 2000), frac=st.floats(0, 1), alpha=st.floats(1e-4, 0.4))
def test_clopper_pearson_brackets_the_observed_rate(n, frac, alpha):
    k = int(round(frac * n))
    lo, hi = float(clopper_pearson_lower(k, n, alpha)), float(clopper_pearson_upper(k, n, alpha))
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    # a wider interval at a smaller alpha
    assert float(clopper_pearson_lower(k, n, alpha / 2)) <= lo and float(clopper_pearson_upper(k, n, alpha / 2)) >= hi


@settings(max_examples=200, deadline=None)
@given(tpr=st.floats(0, 1), fpr=st.floats(1e-6, 1), bump=st.floats(0, 0.5), delta=st.sampled_from([0.0, 1e-5, 1e-3]))
def test_epsilon_from_rates_is_monotone(tpr, fpr, bump, delta):
    base = float(epsilon_from_rates(tpr, fpr, delta))
    assert base >= 0
    assert float(epsilon_from_rates(min(1.0, tpr + bump), fpr, delta)) >= base - 1e-12
    assert float(epsilon_from_rates(tpr, max(1e-6, fpr - bump), delta)) >= base - 1e-12


@settings(max_examples=25, deadline=None)
@given(exponent=st.integers(-20, 20), seed=st.integers(0, 2**16))
def test_audit_bound_does_not_depend_on_the_units_of_the_score(exponent, seed):
    # scaling by a power of two is exact in floating point, so the order of every score is kept
    # (an arbitrary affine map can round two close scores onto one value and move a threshold)
    rng = np.random.default_rng(seed)
    s_in, s_out = rng.normal(size=400) + 2.0, rng.normal(size=400)
    scale = 2.0 ** exponent
    a = audit_scores(s_in, s_out, delta=1e-5, claimed_epsilon=1.0, select_fraction=0.25)
    b = audit_scores(scale * s_in, scale * s_out, delta=1e-5, claimed_epsilon=1.0, select_fraction=0.25)
    assert b.epsilon_lower_bound == pytest.approx(a.epsilon_lower_bound, rel=1e-9, abs=1e-12)


def test_select_fraction_splits_the_trials_and_is_validated():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(size=4000) + 3.0, rng.normal(size=4000)
    # the bound comes from the trials after the selection part: more of them, a tighter bound here
    quarter = audit_scores(s_in, s_out, delta=1e-5, claimed_epsilon=1.0, select_fraction=0.25)
    half = audit_scores(s_in, s_out, delta=1e-5, claimed_epsilon=1.0)
    assert quarter.epsilon_lower_bound != half.epsilon_lower_bound
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="select_fraction"):
            audit_scores(s_in, s_out, delta=1e-5, claimed_epsilon=1.0, select_fraction=bad)
    with pytest.raises(ConfigError, match="NaN"):
        audit_scores(np.r_[s_in[:100], np.nan], s_out[:100], delta=1e-5, claimed_epsilon=1.0)
