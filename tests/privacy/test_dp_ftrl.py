"""DP-FTRL: tree-aggregated noisy sums with restarts and completion; sensitivity and epsilon oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.privacy.accountants import make_accountant
from fedsim.privacy.dp_ftrl import (
    DPFTRLNoise,
    dp_ftrl_epsilon,
    dp_ftrl_rho,
    epoch_sensitivity_squared,
    tree_sensitivity_squared,
)

SHAPES = [(3,), (2, 2)]


def ones():
    return [np.ones(s) for s in SHAPES]


def test_spec_oracle_restarts_with_and_without_completion():
    # n = 50 000, batch 500 (100 steps/epoch), 100 epochs, restart every 20, z = 46.3, delta = 1e-5.
    z = 46.3
    assert dp_ftrl_rho(z, 100, 100, 20, tree_completion=True) * 2 * z * z == pytest.approx(4129)
    assert dp_ftrl_rho(z, 100, 100, 20, tree_completion=False) * 2 * z * z == pytest.approx(2125)
    assert dp_ftrl_epsilon(z, 100, 100, 1e-5, 20, True) == pytest.approx(6.92, abs=0.01)
    assert dp_ftrl_epsilon(z, 100, 100, 1e-5, 20, False) == pytest.approx(4.70, abs=0.01)


def test_single_pass_sensitivity():
    assert tree_sensitivity_squared([1], 1000) == 10 and tree_sensitivity_squared([1], 1024) == 11
    assert epoch_sensitivity_squared(1000, 1, 1000) == 10


@settings(max_examples=25, deadline=None)
@given(spe=st.integers(1, 12), epochs=st.integers(1, 4), extra=st.integers(0, 20))
def test_epoch_sensitivity_matches_brute_force(spe, epochs, extra):
    size = spe * epochs + extra
    brute = max(tree_sensitivity_squared([j + 1 + e * spe for e in range(epochs)], size) for j in range(spe))
    assert epoch_sensitivity_squared(spe, epochs, size) == brute


def test_noise_off_gives_exact_cumulative_sums_across_restarts():
    ftrl = DPFTRLNoise(0.0, 1.0, restart_every=3, seed=0)
    ftrl.init(SHAPES)
    for t in range(1, 11):
        out = ftrl.step(ones())
        for o, s in zip(out, SHAPES):
            np.testing.assert_allclose(o, np.full(s, float(t)))
    assert ftrl.tree_sizes == [4, 4, 4, 1]  # three completed trees (3 -> 4 steps) and the current one


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("completion", [False, True])
def test_noise_variance_after_restart(efficient, completion):
    # After one restart at n = 3 steps and one more step: b = b_last + leaf noise.
    # Plain tree, no completion: popcount(3) + 1 = 3 nodes; completion: root + leaf = 2 nodes.
    # Honaker: node variances sigma^2 / (2 - 2^-h).
    dim, z, c = 40_000, 0.5, 2.0
    ftrl = DPFTRLNoise(z, c, restart_every=3, tree_completion=completion, efficient=efficient, seed=5)
    ftrl.init([(dim,)])
    for _ in range(4):
        out = ftrl.step([np.zeros(dim)])[0]
    w = (lambda h: 1 / (2 - 2.0**-h)) if efficient else (lambda h: 1.0)
    nodes = w(2) + w(0) if completion else w(1) + w(0) + w(0)
    sigma2 = (z * c) ** 2
    assert out.var() == pytest.approx(nodes * sigma2, rel=0.03)


def test_state_dict_resume_is_exact_and_seeded():
    def run(steps):
        f = DPFTRLNoise(1.0, 1.0, restart_every=5, efficient=True, seed=42)
        f.init(SHAPES)
        return f, [f.step(ones()) for _ in range(steps)]

    uninterrupted, outputs = run(16)
    first, _ = run(7)
    resumed = DPFTRLNoise(1.0, 1.0, restart_every=5, efficient=True, seed=42)
    resumed.load_state_dict(first.state_dict())
    for expected in outputs[7:]:
        for x, y in zip(resumed.step(ones()), expected):
            np.testing.assert_array_equal(x, y)
    assert resumed.tree_sizes == uninterrupted.tree_sizes
    other = DPFTRLNoise(1.0, 1.0, restart_every=5, efficient=True, seed=43)
    other.init(SHAPES)
    assert not np.array_equal(other.step(ones())[0], outputs[0][0])  # another seed, other noise


def test_single_participation_event_accounting():
    ftrl = DPFTRLNoise(math.sqrt(10), 1.0)
    ftrl.init([(1,)])
    for _ in range(1000):
        ftrl.step([np.zeros(1)])
    event = ftrl.single_participation_event()
    assert event.rho == pytest.approx(0.5)  # L = 10 levels for T = 1000, z^2 = 10
    acc = make_accountant("rdp")
    acc.compose(event)
    assert acc.epsilon(1e-5) == pytest.approx(4.7285, abs=1e-4)
