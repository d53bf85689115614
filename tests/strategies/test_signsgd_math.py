"""Noisy signSGD / medianSGD: spec section 3 tests (1)-(4) plus the 1-bit wire format."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erf

from fedsim.errors import AggregationError
from fedsim.rng import numpy_rng
from fedsim.strategies.signsgd_math import (
    coordinate_median,
    gradient_from_weights,
    majority_vote,
    noisy_median_step,
    noisy_sign,
    noisy_sign_step,
    pack_signs,
    packed_size,
    perturb,
    server_step,
    unpack_signs,
    vote_packed,
)

A = np.array([1.0, 2.0, 10.0])          # the paper's toy: f = (1/3) sum_i (x - a_i)^2 / 2, optimum 13/3
CHAINS = 8                              # independent runs simulated side by side as coordinates


def toy(step, steps=12000, delta=1e-3, seed=0):
    rng = numpy_rng(seed, "toy")
    x = np.full(CHAINS, 5e-4)
    for _ in range(steps):
        x = step(x, [x - a for a in A], rng, delta)
    return x


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_pack_round_trip_and_size(d, seed):
    signs = np.where(np.random.default_rng(seed).random(d) < 0.5, -1, 1).astype(np.int8)
    packed = pack_signs(signs)
    assert packed.dtype == np.uint8 and packed.size == packed_size(d) == -(-d // 8)
    np.testing.assert_array_equal(unpack_signs(packed, d), signs)


def test_pack_rejects_zero_and_bad_length():
    with pytest.raises(ValueError):
        pack_signs(np.array([1, 0, -1]))
    with pytest.raises(AggregationError):
        unpack_signs(np.zeros(3, dtype=np.uint8), 8)


def test_majority_vote_ties_and_packed_vote():
    signs = np.array([[1, -1, 1, 1], [-1, -1, 1, -1]], dtype=np.int8)
    np.testing.assert_array_equal(majority_vote(signs), [0, -1, 1, 0])
    np.testing.assert_array_equal(vote_packed([pack_signs(s) for s in signs], 4), [0, -1, 1, 0])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 3, 5, 7, 9]), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_plain_vote_equals_sign_of_median_for_odd_m(m, d, seed):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((m, d))
    vote = majority_vote([noisy_sign(gi, 0.0, rng) for gi in g])
    np.testing.assert_array_equal(vote, np.sign(np.median(g, axis=0)))


def test_expected_noisy_sign_is_erf():
    g = np.array([-2.0, -0.5, 0.0, 0.3, 1.5])
    b, samples = 1.3, 100_000
    rng = numpy_rng(0, "erf")
    mean = np.mean([noisy_sign(g, b, rng) for _ in range(samples)], axis=0)
    expected = erf(g / (b * np.sqrt(2)))
    se = np.sqrt((1 - expected ** 2) / samples)
    assert np.all(np.abs(mean - expected) < 5 * se + 1e-12)


def test_plain_methods_stall_at_the_median():
    sign = toy(lambda x, g, rng, dl: noisy_sign_step(x, g, 0.0, dl, rng))
    median = toy(lambda x, g, rng, dl: noisy_median_step(x, g, 0.0, dl, rng))
    assert np.all(np.abs(sign - 2.0) < 0.01) and np.all(np.abs(median - 2.0) < 0.01)
    assert np.mean(sign - A.mean()) == pytest.approx(-7 / 3, abs=0.01)      # true gradient stays ~ -7/3


def test_noisy_methods_move_toward_the_mean():
    sign = toy(lambda x, g, rng, dl: noisy_sign_step(x, g, 5.0, dl, rng))
    median = toy(lambda x, g, rng, dl: noisy_median_step(x, g, 5.0, dl, rng))
    assert np.all(sign > 3.0) and np.all(sign < 13 / 3 + 0.5)
    assert np.all(median > 3.3) and np.all(median < 13 / 3 + 1.0)


def test_noise_after_aggregation_does_not_close_the_gap():
    def sign_then_noise(x, g, rng, dl):
        vote = np.sign(majority_vote([noisy_sign(gi, 0.0, rng) for gi in g]) + perturb(np.zeros_like(x), 5.0, rng))
        return server_step(x, vote, dl)

    def median_then_noise(x, g, rng, dl):
        return server_step(x, perturb(coordinate_median(g), 5.0, rng), dl)

    # the chains random-walk around the median (x = 2) but never drift toward the optimum 13/3
    for x in (toy(sign_then_noise), toy(median_then_noise)):
        assert np.all(np.abs(x - 2.0) < 0.4) and abs(np.mean(x) - 2.0) < 0.2


def test_zero_handling_determinism_and_weights():
    g = np.array([0.0, 1.0, -2.0, 0.0])
    np.testing.assert_array_equal(noisy_sign(g, 0.0, numpy_rng(1)), [0, 1, -1, 0])
    np.testing.assert_array_equal(noisy_sign(g, 0.0, numpy_rng(1), zero="positive"), [1, 1, -1, 1])
    rnd = noisy_sign(g, 0.0, numpy_rng(1), zero="random")
    assert set(rnd.tolist()) <= {-1, 1}
    np.testing.assert_array_equal(noisy_sign(g, 2.0, numpy_rng(7, "c")), noisy_sign(g, 2.0, numpy_rng(7, "c")))
    w_old, grad = np.array([1.0, 2.0]), np.array([0.5, -1.0])
    np.testing.assert_allclose(gradient_from_weights(w_old - 0.1 * grad, w_old, 0.1), grad)
    with pytest.raises(ValueError):
        perturb(g, -1.0, numpy_rng(0))
