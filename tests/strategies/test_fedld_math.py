"""FedLD principal-gradient aggregation: spec section 1 tests (1)-(7) plus guards and state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedsim.errors import AggregationError, ConfigError
from fedsim.strategies.fedld_math import (
    FedLDAggregator,
    fedld_aggregate,
    fedld_aggregate_layer,
    fedld_client_projections,
    num_principal_directions,
    principal_directions,
)

SETTINGS = settings(max_examples=80, deadline=None)


def reference_fedld(G: np.ndarray, kappa: float) -> np.ndarray:
    """Independent, loop-based transcription of the spec's pseudo-code (float64, no shortcuts)."""
    m = G.shape[0]
    H = G @ G.T / m
    s, E = np.linalg.eigh(H)
    order = np.argsort(s)[::-1]
    s, E = np.clip(s[order], 0, None), E[:, order]
    V = E.T @ G
    k = math.floor(m * kappa + 1e-9)
    r = np.zeros_like(G)
    for j in range(k):
        if s[j] <= 1e-12 * s[0]:
            continue
        if sum(G[i] @ V[j] >= 0 for i in range(m)) < sum(G[i] @ V[j] < 0 for i in range(m)):
            V[j] = -V[j]
        for i in range(m):
            proj = (G[i] @ V[j]) / (V[j] @ V[j]) * V[j]
            r[i] += proj * s[j] / s.sum() * np.linalg.norm(G[i]) / np.linalg.norm(proj)
    return r.mean(axis=0)


@st.composite
def client_matrix(draw, min_m=2, max_m=7, max_d=12):
    """Gaussian client deltas with a clear eigen-gap structure (generic data), any scale."""
    m = draw(st.integers(min_m, max_m))
    d = draw(st.integers(2, max_d))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-4, 1.0, 37.0, 1e4]))
    kappa = draw(st.sampled_from([0.5, 0.8, 1.0]))
    G = np.random.default_rng(seed).standard_normal((m, d)) * scale
    s = np.sort(np.linalg.eigvalsh(G @ G.T / m))[::-1]
    s = s[s > 1e-10 * s[0]]
    assume(len(s) < 2 or np.min(-np.diff(s)) > 1e-4 * s[0])      # distinct principal directions
    return G, kappa


@SETTINGS
@given(client_matrix())
def test_matches_loop_reference(data):
    G, kappa = data
    got = fedld_aggregate_layer(list(G), kappa)
    np.testing.assert_allclose(got, reference_fedld(G, kappa), rtol=1e-7, atol=1e-9 * np.abs(G).max())


@SETTINGS
@given(client_matrix())
def test_first_round_is_unweighted_mean(data):
    G, kappa = data
    np.testing.assert_allclose(fedld_aggregate_layer(list(G), kappa, first_round=True), G.mean(axis=0),
                               rtol=1e-13, atol=0)
    agg = FedLDAggregator(kappa)
    out = agg.aggregate_deltas([[g] for g in G])
    np.testing.assert_allclose(out[0], G.mean(axis=0), rtol=1e-13)


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 20), st.integers(0, 2**32 - 1), st.sampled_from([1e-3, 1.0, 1e3]))
def test_identical_updates_give_that_update(m, d, seed, scale):
    g = np.random.default_rng(seed).standard_normal(d) * scale
    out = fedld_aggregate_layer([g.copy() for _ in range(m)], 0.8)
    np.testing.assert_allclose(out, g, rtol=1e-9, atol=1e-12 * scale)


@SETTINGS
@given(client_matrix(), st.integers(0, 2**32 - 1))
def test_permutation_invariance(data, seed):
    G, kappa = data
    perm = np.random.default_rng(seed).permutation(G.shape[0])
    a = fedld_aggregate_layer(list(G), kappa)
    b = fedld_aggregate_layer(list(G[perm]), kappa)
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(G).max())


@SETTINGS
@given(client_matrix(), st.floats(1e-3, 1e3))
def test_positive_homogeneity(data, c):
    G, kappa = data
    a = fedld_aggregate_layer(list(c * G), kappa)
    b = c * fedld_aggregate_layer(list(G), kappa)
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * c * np.abs(G).max())


@SETTINGS
@given(client_matrix(), st.integers(0, 2**32 - 1))
def test_rotation_equivariance(data, seed):
    G, kappa = data
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((G.shape[1], G.shape[1])))
    a = fedld_aggregate_layer(list(G @ Q), kappa)
    b = fedld_aggregate_layer(list(G), kappa) @ Q
    np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9 * np.abs(G).max())


@SETTINGS
@given(client_matrix())
def test_result_in_row_space(data):
    G, kappa = data
    delta = fedld_aggregate_layer(list(G), kappa)
    coef, *_ = np.linalg.lstsq(G.T, delta, rcond=None)
    np.testing.assert_allclose(G.T @ coef, delta, rtol=1e-8, atol=1e-10 * np.abs(G).max())


@SETTINGS
@given(client_matrix())
def test_projected_norms(data):
    G, kappa = data
    R = fedld_client_projections(G, kappa)
    g_norm, r_norm = np.linalg.norm(G, axis=1), np.linalg.norm(R, axis=1)
    assert np.all(r_norm <= g_norm * (1 + 1e-12))
    _, s_kept = principal_directions(G, kappa)
    s_all = np.clip(np.linalg.eigvalsh(G @ G.T / G.shape[0]), 0, None)
    expected = g_norm * np.sqrt(np.sum((s_kept / s_all.sum()) ** 2))
    np.testing.assert_allclose(r_norm, expected, rtol=1e-8)


def test_directions_are_orthogonal_and_majority_aligned():
    G = np.random.default_rng(3).standard_normal((5, 9))
    V, s = principal_directions(G, 0.8)
    assert V.shape == (4, 9)
    np.testing.assert_allclose(V @ V.T, np.diag(G.shape[0] * s), atol=1e-10)
    inner = G @ V.T
    assert np.all((inner >= 0).sum(axis=0) >= (inner < 0).sum(axis=0))


def test_guards_scalar_integer_k0_and_zero():
    rng = np.random.default_rng(0)
    assert fedld_aggregate_layer([np.array([1.0]), np.array([3.0])], 0.8) == pytest.approx(2.0)
    ints = fedld_aggregate_layer([np.array(10), np.array(11), np.array(11)], 0.8)
    assert ints.dtype == np.array(10).dtype and int(ints) == 11
    g = rng.standard_normal(6)
    np.testing.assert_allclose(fedld_aggregate_layer([g], 0.8), g)                    # k = floor(0.8) = 0
    np.testing.assert_allclose(fedld_aggregate_layer([g, -g], 0.4), 0.5 * (g - g))   # k = 0 -> mean
    np.testing.assert_array_equal(fedld_aggregate_layer([np.zeros(4), np.zeros(4)], 0.8), np.zeros(4))
    # orthogonal clients with equal norms: no NaN from 0/0
    out = fedld_aggregate_layer([np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3)], 1.0)
    assert np.all(np.isfinite(out))
    assert num_principal_directions(100, 0.57) == 57


def test_shapes_dtypes_and_errors():
    rng = np.random.default_rng(1)
    w = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(4)]
    out = fedld_aggregate_layer(w, 0.8)
    assert out.shape == (3, 4) and out.dtype == np.float32
    with pytest.raises(AggregationError):
        fedld_aggregate_layer([np.zeros(3), np.zeros(4)], 0.8)
    with pytest.raises(AggregationError):
        fedld_aggregate_layer([np.array([np.nan, 1.0]), np.zeros(2)], 0.8)
    with pytest.raises(AggregationError):
        fedld_aggregate([], 0.8)
    with pytest.raises(ConfigError):
        FedLDAggregator(kappa=1.5)
    with pytest.raises(AggregationError):
        fedld_aggregate([{"a": np.zeros(2)}, {"b": np.zeros(2)}])


def test_aggregator_rounds_state_and_partial_participation():
    rng = np.random.default_rng(2)
    glob = {"conv.weight": rng.standard_normal((2, 3)), "bn.num_batches_tracked": np.array(5),
            "frozen": np.ones(3)}
    agg = FedLDAggregator(0.8)
    clients = [{k: v + (rng.standard_normal(np.shape(v)) if k == "conv.weight" else 0) for k, v in glob.items()}
               for _ in range(5)]
    clients = [dict(c, **{"bn.num_batches_tracked": np.array(8)}) for c in clients]
    new = agg.aggregate(glob, clients)
    mean = np.mean([c["conv.weight"] for c in clients], axis=0)
    np.testing.assert_allclose(new["conv.weight"], mean)                      # round 1: FedAvg (unweighted)
    assert int(new["bn.num_batches_tracked"]) == 8
    assert agg.seen == {"conv.weight": True, "bn.num_batches_tracked": True, "frozen": False}
    # round 2 with only 3 of the clients (partial participation), principal aggregation now
    deltas = [{k: c[k] - new[k] for k in new} for c in clients[:3]]
    state = agg.state_dict()
    d2 = agg.aggregate_deltas(deltas)
    np.testing.assert_allclose(d2["conv.weight"].ravel(),
                               reference_fedld(np.stack([d["conv.weight"].ravel() for d in deltas]), 0.8))
    resumed = FedLDAggregator()
    resumed.load_state_dict(state)
    d2b = resumed.aggregate_deltas(deltas)
    for k in d2:
        np.testing.assert_array_equal(d2[k], d2b[k])
    # list-of-lists keeps integer keys through a state round trip
    agg_l = FedLDAggregator()
    agg_l.aggregate_deltas([[np.ones(2)], [np.ones(2)]])
    again = FedLDAggregator()
    again.load_state_dict(agg_l.state_dict())
    assert again.seen == {0: True}
