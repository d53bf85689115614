"""Hypothesis properties of the baseline aggregations."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsim.strategies.fedavg_math import (coordinate_median, fedopt_step, krum_scores, multi_krum,
                                           trimmed_mean, weighted_mean)

finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@st.composite
def batches(draw, min_m=1, max_m=7):
    m = draw(st.integers(min_m, max_m))
    shapes = draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3)), min_size=1, max_size=3))
    ups = [[draw(arrays(np.float64, s, elements=finite)) for s in shapes] for _ in range(m)]
    w = draw(st.lists(st.integers(1, 1000), min_size=m, max_size=m))
    return ups, w


@settings(max_examples=60, deadline=None)
@given(batches(), st.randoms())
def test_weighted_mean_is_order_invariant(b, rnd):
    ups, w = b
    idx = list(range(len(ups)))
    rnd.shuffle(idx)
    a = weighted_mean(ups, w)
    p = weighted_mean([ups[i] for i in idx], [w[i] for i in idx])
    for x, y in zip(a, p):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_weighted_mean_matches_definition_and_bounds(b):
    ups, w = b
    agg = weighted_mean(ups, w)
    W = np.asarray(w, float)
    for layer, out in zip(zip(*ups), agg):
        st_ = np.stack(layer)
        np.testing.assert_allclose(out, np.tensordot(W / W.sum(), st_, axes=1), rtol=1e-9, atol=1e-9)
        assert np.all(out <= st_.max(0) + 1e-9) and np.all(out >= st_.min(0) - 1e-9)


@settings(max_examples=40, deadline=None)
@given(batches())
def test_identical_weights_equal_plain_mean(b):
    ups, _ = b
    agg = weighted_mean(ups, [5] * len(ups))
    for layer, out in zip(zip(*ups), agg):
        np.testing.assert_allclose(out, np.mean(np.stack(layer), 0), rtol=1e-9, atol=1e-9)


def test_matches_flowers_own_weighted_average():
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    rng = np.random.default_rng(0)
    ups = [[rng.normal(size=(3, 2)), rng.normal(size=4)] for _ in range(5)]
    w = [3, 1, 7, 2, 9]
    rds = [RecordDict({"a": ArrayRecord(u), "m": MetricRecord({"num-examples": n})}) for u, n in zip(ups, w)]
    ref = aggregate_arrayrecords(rds, "num-examples").to_numpy_ndarrays()
    for x, y in zip(weighted_mean(ups, w), ref):
        np.testing.assert_allclose(x, y, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_median_within_coordinate_range(b):
    ups, _ = b
    for layer, out in zip(zip(*ups), coordinate_median(ups)):
        st_ = np.stack(layer)
        assert np.all(out >= st_.min(0)) and np.all(out <= st_.max(0))


@settings(max_examples=60, deadline=None)
@given(batches(min_m=3), st.floats(0.0, 0.49))
def test_trimmed_mean_within_range_and_robust(b, beta):
    ups, _ = b
    m = len(ups)
    if m - 2 * int(np.floor(beta * m)) < 1:
        return
    out = trimmed_mean(ups, beta)
    for layer, o in zip(zip(*ups), out):
        st_ = np.stack(layer)
        assert np.all(o >= st_.min(0) - 1e-9) and np.all(o <= st_.max(0) + 1e-9)


def test_trimmed_mean_ignores_one_outlier():
    honest = [[np.full(3, 1.0)] for _ in range(9)]
    out = trimmed_mean(honest + [[np.full(3, 1e9)]], 0.1)
    np.testing.assert_allclose(out[0], 1.0)


def test_median_breakdown_below_half():
    honest = [[np.full(2, 1.0)] for _ in range(6)]
    bad = [[np.full(2, -1e6)] for _ in range(5)]
    np.testing.assert_allclose(coordinate_median(honest + bad)[0], 1.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(5, 9), st.integers(0, 10_000))
def test_krum_picks_an_honest_update(m, seed):
    rng = np.random.default_rng(seed)
    f = (m - 3) // 2
    honest = [[rng.normal(0, 0.1, size=5)] for _ in range(m - f)]
    bad = [[rng.normal(100, 1, size=5)] for _ in range(f)]
    ups = honest + bad
    _, chosen = multi_krum(ups, f, 1)
    assert chosen[0] < m - f
    assert krum_scores(ups, f).shape == (m,)


def test_fedadam_step_moves_along_delta():
    p = [np.zeros(3)]
    d = [np.array([1.0, -2.0, 0.0])]
    new, m, v = fedopt_step(p, d, None, None, kind="adam", eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    assert new[0][0] > 0 and new[0][1] < 0 and new[0][2] == 0
    new2, _, _ = fedopt_step(p, d, None, None, kind="yogi", eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    assert np.sign(new2[0][0]) == 1
