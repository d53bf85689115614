"""Canary audit (reliability.md §3, D5/D6): sound on the real mechanism, catches a noise/3 bug."""

from __future__ import annotations

import numpy as np
import pytest

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
