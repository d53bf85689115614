"""Hypothesis properties of centered clipping and bucketing (Karimireddy, He, Jaggi, ICML 2021 / ICLR 2022)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsim.strategies.centered_clip_math import bucket_means, centered_clip, clip_weights

finite = st.floats(-100, 100, allow_nan=False, width=64)


@st.composite
def updates(draw, min_m=1, max_m=8):
    m, d = draw(st.integers(min_m, max_m)), draw(st.integers(1, 6))
    return draw(arrays(np.float64, (m, d), elements=finite)), draw(arrays(np.float64, (d,), elements=finite))


@settings(max_examples=100, deadline=None)
@given(updates())
def test_no_attacker_and_a_large_radius_give_the_mean(u):
    x, v0 = u
    tau = float(np.linalg.norm(x - v0, axis=1).max()) + 1.0  # nothing is clipped
    v, clipped = centered_clip(x, v0, tau, iterations=1)
    np.testing.assert_allclose(v, x.mean(axis=0), rtol=1e-9, atol=1e-9)
    assert clipped == 0.0


@settings(max_examples=100, deadline=None)
@given(updates(), st.randoms(), st.floats(0.01, 50), st.integers(1, 4))
def test_permutation_invariant(u, rnd, tau, iterations):
    x, v0 = u
    idx = list(range(len(x)))
    rnd.shuffle(idx)
    a, _ = centered_clip(x, v0, tau, iterations)
    b, _ = centered_clip(x[idx], v0, tau, iterations)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(updates(min_m=2), st.floats(0.01, 50), arrays(np.float64, 6, elements=st.floats(-1e6, 1e6, width=64)))
def test_one_client_moves_one_iteration_by_at_most_two_tau_over_m(u, tau, bad):
    """Whatever one client sends, it moves the result of one iteration by at most ``2τ/m``: the
    bounded influence that makes centered clipping robust."""
    x, v0 = u
    y = x.copy()
    y[0] = bad[: x.shape[1]]
    a, _ = centered_clip(x, v0, tau)
    b, _ = centered_clip(y, v0, tau)
    assert np.linalg.norm(a - b) <= 2 * tau / len(x) * (1 + 1e-9) + 1e-9


def test_clipping_on_a_small_example():
    x = np.array([[3.0, 4.0], [0.0, 1.0]])  # distances 5 and 1 from 0
    v, clipped = centered_clip(x, np.zeros(2), tau=2.0)
    np.testing.assert_allclose(v, ([3 * 0.4, 4 * 0.4] + np.array([0.0, 1.0])) / 2)
    assert clipped == 0.5
    np.testing.assert_allclose(clip_weights(np.array([[0.0, 0.0], [0.0, 4.0]]), 2.0), [1.0, 0.5])


def test_iterations_move_towards_the_honest_majority():
    x = np.array([[1.0], [1.0], [1.0], [100.0]])
    one, _ = centered_clip(x, np.zeros(1), tau=1.0, iterations=1)
    many, _ = centered_clip(x, np.zeros(1), tau=1.0, iterations=20)
    # the mean would be 25.75; the fixed point 3·(1 − v) + τ = 0 is v = 4/3: the outlier adds τ·f/(m − f)
    assert one[0] == pytest.approx(1.0) and many[0] == pytest.approx(4 / 3, rel=1e-6)


def test_bucket_means():
    x = np.arange(10.0).reshape(5, 2)
    np.testing.assert_allclose(bucket_means(x, 2, np.array([4, 3, 2, 1, 0])), [[7, 8], [3, 4], [0, 1]])
    np.testing.assert_allclose(bucket_means(x, 1, np.arange(5)), x)
    with pytest.raises(ValueError):
        bucket_means(x, 2, np.array([0, 0, 1, 2, 3]))
    with pytest.raises(ValueError):
        centered_clip(x, np.zeros(2), tau=0.0)
