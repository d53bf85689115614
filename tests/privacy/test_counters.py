"""Continual-release counters: exact sums without noise, variance formulas (Monte Carlo), spec §6 oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.errors import ConfigError, UnknownNameError
from fedsim.privacy.counters import (
    COUNTERS,
    BinaryTreeCounter,
    TreeNoise,
    make_counter,
    sqrt_coefficients,
    sqrt_factor_matrix,
    tree_levels,
)

MECHANISMS = ["tree", "honaker", "sqrt"]


def test_registry():
    assert COUNTERS.names() == ["honaker", "sqrt", "tree"]
    with pytest.raises(UnknownNameError):
        make_counter("matrix", 8, 1.0)


@pytest.mark.parametrize("n", [1, 2, 17, 256, 512])
def test_sqrt_factor_squares_to_all_ones_lower_triangle(n):
    L = sqrt_factor_matrix(n)
    np.testing.assert_allclose(L @ L, np.tril(np.ones((n, n))), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sqrt_coefficients(5), [1, 1 / 2, 3 / 8, 5 / 16, 35 / 128])


def test_tree_noise_popcount_with_unit_nodes():
    # DP-FTRL's CummuNoise check: every node noise = 1 -> cumulative noise at t = popcount(t).
    tree = TreeNoise((1,), lambda h, i: np.ones(1))
    assert [float(tree.step()[0]) for _ in range(40)] == [bin(t).count("1") for t in range(1, 41)]
    assert float(tree.complete()[0]) == 1.0 and tree.steps == 64  # completion leaves the root alone


@pytest.mark.parametrize("name", MECHANISMS + ["laplace"])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_exact_prefix_sums_without_noise(name, data):
    dim = data.draw(st.sampled_from([(), (3,)]))
    n = data.draw(st.integers(1, 40))
    bound = 0.3 if dim else 1.0  # stay inside the l2 (and, for Laplace, l1) unit ball
    values = st.floats(-bound, bound, allow_nan=False)
    stream = np.array(data.draw(st.lists(st.lists(values, min_size=3, max_size=3) if dim else values,
                                         min_size=n, max_size=n)))
    kwargs = {"distribution": "laplace"} if name == "laplace" else {}
    counter = make_counter("tree" if name == "laplace" else name, 64, 1.0, shape=dim, noise=False, **kwargs)
    streamed = np.array([counter.update(x) for x in stream])
    assert np.array_equal(streamed, np.cumsum(stream, axis=0))
    batch = make_counter("tree" if name == "laplace" else name, 64, 1.0, shape=dim, noise=False, **kwargs)
    assert np.array_equal(batch.release(stream), np.cumsum(stream, axis=0))


@pytest.mark.parametrize("name", MECHANISMS)
def test_streaming_equals_batch_release(name):
    stream = np.random.default_rng(0).uniform(-0.3, 0.3, (100, 4))
    a = make_counter(name, 128, 0.5, shape=(4,), rng=np.random.default_rng(7))
    b = make_counter(name, 128, 0.5, shape=(4,), rng=np.random.default_rng(7))
    np.testing.assert_allclose(a.release(stream), np.array([b.update(x) for x in stream]), atol=1e-12)
    np.testing.assert_allclose(a.update(stream[0]), b.update(stream[0]), atol=1e-12)  # and continues alike


CASES = [("tree", {}), ("honaker", {}), ("sqrt", {}), ("tree", {"distribution": "laplace"})]


@pytest.mark.parametrize("name, kwargs", CASES)
def test_monte_carlo_variance_within_3_standard_errors(name, kwargs):
    T, trials, rho = 64, 20_000, 0.7
    counter = make_counter(name, T, rho, shape=(trials,), rng=np.random.default_rng(11), **kwargs)
    noise = counter.release(np.zeros((T, trials)))
    for t in sorted({1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, T}):
        sq = noise[t - 1] ** 2
        se = sq.std(ddof=1) / math.sqrt(trials)
        assert abs(sq.mean() - counter.theoretical_variance(t)) <= 3 * se, (name, t)


@pytest.mark.parametrize(
    "T, name, max_var, mean_var",
    [(1024, "tree", 55.0, 27.5), (1024, "honaker", 31.9, 16.0), (1024, "sqrt", 5.36, 4.84),
     (2**14, "tree", 105, 52.5), (2**14, "honaker", 58.5, 29.3), (2**14, "sqrt", 8.63, 7.97)],
)
def test_spec_oracle_table(T, name, max_var, mean_var):
    v = make_counter(name, T, 1.0).variances()
    assert v.max() == pytest.approx(max_var, abs=0.06)
    assert v.mean() == pytest.approx(mean_var, abs=0.06)


def test_calibration_and_growth():
    rho, T = 0.5, 1000
    tree = make_counter("tree", T, rho)
    assert tree_levels(1000) == 10 and tree_levels(1024) == 11
    assert tree.node_variance == pytest.approx(10 / (2 * rho))  # sigma^2 = L C^2 / (2 rho)
    sq = make_counter("sqrt", T, rho)
    s = float(np.sum(sqrt_coefficients(T) ** 2))
    assert sq.theoretical_variance(T) == pytest.approx(s * s / (2 * rho))
    assert s <= 1 + math.log((4 * T - 1) / 3) / math.pi  # the spec's proved bound
    assert s == pytest.approx(math.log(T) / math.pi + 1.0663, abs=1e-3)  # asymptotic form
    # slopes in log T: tree std ~ log2 T, sqrt std ~ ln T / pi, laplace variance ~ log^3 T
    Ts = np.array([2**k for k in range(6, 15)])
    tree_std = [math.sqrt(make_counter("tree", int(n), 1.0).variances().max()) for n in Ts]
    sqrt_std = [math.sqrt(make_counter("sqrt", int(n), 1.0).variances().max()) for n in Ts]
    lap = [BinaryTreeCounter(int(n), epsilon=1.0, distribution="laplace").variances().max() for n in Ts]
    tree_slope = np.polyfit(np.log2(Ts), tree_std, 1)[0]
    sqrt_slope = np.polyfit(np.log(Ts), np.array(sqrt_std) * math.sqrt(2.0), 1)[0]
    lap_slope = np.polyfit(np.log(np.log2(Ts)), np.log(lap), 1)[0]
    assert tree_slope == pytest.approx(1 / math.sqrt(2), rel=0.1)
    assert sqrt_slope == pytest.approx(1 / math.pi, rel=0.1)
    assert lap_slope == pytest.approx(3.0, abs=0.3)


@pytest.mark.parametrize("name", MECHANISMS)
@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 3000), rho=st.floats(0.01, 10.0), factor=st.floats(1.0, 10.0))
def test_variance_decreases_with_rho_and_is_bounded(name, T, rho, factor):
    c = make_counter(name, T, rho)
    v = c.variances()
    assert np.all(make_counter(name, T, rho * factor).variances() <= v * (1 + 1e-12))
    if name != "sqrt":  # each record in at most L nodes, each estimate in at most L nodes
        assert v.max() <= tree_levels(T) ** 2 / (2 * rho) * (1 + 1e-12)


def test_records_are_clipped_and_misuse_is_typed():
    c = make_counter("tree", 4, 1.0, noise=False, sensitivity=2.0)
    assert c.update(10.0) == 2.0
    v = make_counter("tree", 4, 1.0, shape=(2,), noise=False)
    np.testing.assert_allclose(v.update(np.array([3.0, 4.0])), [0.6, 0.8])
    with pytest.raises(ConfigError, match="horizon"):
        for _ in range(5):
            c.update(0.0)
    with pytest.raises(ConfigError, match="shape"):
        v.update(np.zeros(3))
    with pytest.raises(ConfigError):
        make_counter("honaker", 4, 1.0, distribution="laplace")
    with pytest.raises(ConfigError):
        make_counter("sqrt", 4, -1.0)
