"""Client-level DP math: clipping bounds (D2), noise calibration (D3), DP-FedAvg and adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from fedsim.errors import AggregationError, ConfigError
from fedsim.privacy.clipping import (
    adaptive_noise_multiplier,
    clip_flat,
    clip_per_layer,
    dp_fedavg_aggregate,
    gaussian_noise_for_sum,
    global_l2_norm,
    per_layer_bounds,
    update_clip_norm,
)

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)  # huge, tiny and denormal included
layers = st.lists(hnp.arrays(np.float64, hnp.array_shapes(max_dims=2, max_side=4), elements=finite),
                  min_size=1, max_size=3)
layers32 = st.lists(hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=4),
                               elements=st.floats(width=32, allow_nan=False, allow_infinity=False)), min_size=1, max_size=3)


@settings(max_examples=150, deadline=None)
@given(update=st.one_of(layers, layers32), clip=st.floats(1e-6, 1e6))
def test_flat_clip_bounds_norm_and_keeps_small_updates(update, clip):
    clipped, norm = clip_flat(update, clip)
    assert global_l2_norm(clipped) <= clip * (1 + 1e-6)
    assert [c.dtype for c in clipped] == [np.asarray(u).dtype for u in update]
    if norm <= clip:
        assert all(c is u or np.array_equal(c, u) for c, u in zip(clipped, update))
    else:  # direction kept
        flat_u = np.concatenate([np.ravel(u) for u in update]).astype(np.float64)
        flat_c = np.concatenate([np.ravel(c) for c in clipped]).astype(np.float64)
        nz = np.abs(flat_u) > 1e-300 * norm
        assert np.all(np.sign(flat_c[nz]) * np.sign(flat_u[nz]) >= 0)


@settings(max_examples=80, deadline=None)
@given(update=layers, clip=st.floats(1e-3, 1e3), how=st.sampled_from(["equal", "size"]))
def test_per_layer_clip_bounds_each_layer_and_total(update, clip, how):
    bounds = per_layer_bounds(clip, [u.shape for u in update], how)
    assert math.sqrt(sum(b * b for b in bounds)) == pytest.approx(clip, rel=1e-12)
    clipped, norms = clip_per_layer(update, bounds)
    for c, b in zip(clipped, bounds):
        assert global_l2_norm([c]) <= b * (1 + 1e-6)
    assert global_l2_norm(clipped) <= clip * (1 + 1e-6)


def test_non_finite_updates_are_rejected():
    with pytest.raises(AggregationError, match="NaN or Inf"):
        clip_flat([np.array([1.0, np.nan])], 1.0)
    with pytest.raises(AggregationError):
        clip_flat([np.array([np.inf])], 1.0)
    with pytest.raises(ConfigError):
        clip_flat([np.ones(2)], 0.0)


def test_norm_handles_overflow_and_zeros():
    assert global_l2_norm([np.array([1e200, 1e200])]) == pytest.approx(math.sqrt(2) * 1e200)
    assert global_l2_norm([np.array([5e-324, 5e-324])]) > 0
    assert global_l2_norm([np.zeros(3), np.zeros((2, 2))]) == 0.0


def test_noise_std_mean_and_normality():
    # D3: zero updates, n = 10^6 draws: |sigma_hat/sigma - 1| <= 1 %, |mean| <= 5 sigma/sqrt(n), KS p >= 1e-3.
    sigma = 0.7
    noise = gaussian_noise_for_sum([(1000, 1000)], sigma, np.random.default_rng(0))[0].ravel()
    n = noise.size
    assert abs(noise.std() / sigma - 1) <= 0.01
    assert abs(noise.mean()) <= 5 * sigma / math.sqrt(n)
    assert stats.kstest(noise[:100_000] / sigma, "norm").pvalue >= 1e-3


def test_dp_fedavg_aggregate_mean_and_noise():
    rng = np.random.default_rng(1)
    updates = [[np.full(3, 10.0), np.zeros((2, 2))], [np.array([0.1, 0.0, 0.0]), np.zeros((2, 2))]]
    out = dp_fedavg_aggregate(updates, clip_norm=1.0, noise_multiplier=0.0, rng=rng, denominator=4)
    expected = (np.full(3, 1 / math.sqrt(3)) + np.array([0.1, 0, 0])) / 4  # fixed denominator m = 4
    np.testing.assert_allclose(out.update[0], expected, rtol=1e-9)
    assert out.clipped_fraction == 0.5 and out.norms[0] == pytest.approx(math.sqrt(300))
    # noise on the mean has std z*C/m
    draws = np.array([dp_fedavg_aggregate([[np.zeros(2000)]], 2.0, 1.5, rng, denominator=5).update[0]
                      for _ in range(50)]).ravel()
    assert draws.std() == pytest.approx(1.5 * 2.0 / 5, rel=0.02)
    with pytest.raises(ConfigError):
        dp_fedavg_aggregate(updates, 1.0, 1.0, rng, denominator=1)
    with pytest.raises(AggregationError):
        dp_fedavg_aggregate([], 1.0, 1.0, rng)


def test_adaptive_clipping_noise_split_and_update():
    # z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2); spending nothing on the count leaves z.
    z, sigma_b = 1.0, 5.0
    z_delta = adaptive_noise_multiplier(z, sigma_b)
    assert z_delta ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2)
    assert z_delta > z
    with pytest.raises(ConfigError, match="2σ_b"):
        adaptive_noise_multiplier(1.0, 0.4)
    rng = np.random.default_rng(0)
    # all clients unclipped -> fraction 1 > target 0.5 -> shrink by exp(-0.2 * 0.5) without noise
    assert update_clip_norm(1.0, 10, 10, 0.5, 0.2, 0.0, rng) == pytest.approx(math.exp(-0.1))
    assert update_clip_norm(1.0, 0, 10, 0.5, 0.2, 0.0, rng) == pytest.approx(math.exp(0.1))


def test_adaptive_clip_tracks_the_quantile():
    rng = np.random.default_rng(3)
    clip, m = 0.1, 100
    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=m)  # median norm = 1
        clip = update_clip_norm(clip, int(np.sum(norms <= clip)), m, 0.5, 0.2, m / 20, rng)
    assert clip == pytest.approx(1.0, rel=0.15)
