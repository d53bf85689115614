"""Straggler models and the simulated wall-clock."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.errors import ConfigError
from fedsim.rng import numpy_rng
from fedsim.strategies.sequential_gc import MultiplexedSGC
from fedsim.strategies.stragglers import (
    ComputeTimeModel,
    bernoulli_stragglers,
    bursty_stragglers,
    follows_bursty_model,
    gc_round_times,
    gilbert_elliott_stragglers,
    satisfies_bursty_model,
    sequential_round_times,
    simulate_wallclock,
    stragglers_from_times,
    uncoded_round_times,
)


def test_bernoulli_rate_shape_and_determinism():
    pat = bernoulli_stragglers(numpy_rng(0, "b"), 50, 400, 0.2)
    assert pat.shape == (400, 50) and pat.dtype == bool
    assert pat.mean() == pytest.approx(0.2, abs=0.01)
    np.testing.assert_array_equal(pat, bernoulli_stragglers(numpy_rng(0, "b"), 50, 400, 0.2))
    with pytest.raises(ConfigError):
        bernoulli_stragglers(numpy_rng(0), 2, 2, 1.5)


def test_gilbert_elliott_stationary_rate_and_burst_length():
    p, q = 0.05, 0.25
    pat = gilbert_elliott_stragglers(numpy_rng(1, "ge"), 200, 2000, p, q)
    assert pat.mean() == pytest.approx(p / (p + q), abs=0.01)
    col = pat.T.astype(np.int8)
    starts = np.sum(np.diff(col, axis=1) == 1)
    mean_burst = col[:, 1:].sum() / max(starts, 1)
    assert mean_burst == pytest.approx(1 / q, rel=0.1)
    assert not gilbert_elliott_stragglers(numpy_rng(1), 5, 3, 0.5, 0.5, start="good")[0].any()


def test_bursty_model_checks_follow_the_reference_rules():
    n, B, W, lam = 4, 2, 4, 2
    hist = np.zeros((0, n), bool)
    pat = np.zeros((8, n), bool)
    pat[0:2, 0] = True                              # burst of length 2 = B: fine
    assert satisfies_bursty_model(pat, B, W, lam)
    pat[3, 0] = True                                # straggles again in rounds r-W+1..r-B: breaks
    assert not satisfies_bursty_model(pat, B, W, lam)
    pat[3, 0] = False
    pat[5, 0] = True                                # r-W+1 = 2 > 1: a new burst is fine
    assert satisfies_bursty_model(pat, B, W, lam)
    pat[5, 1] = pat[4, 2] = True                    # 3 distinct stragglers within a window of 4
    assert not satisfies_bursty_model(pat, B, W, lam)
    assert follows_bursty_model(hist, np.array([1, 1, 0, 0], bool), B, W, lam)
    assert not follows_bursty_model(hist, np.array([1, 1, 1, 0], bool), B, W, lam)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 10), st.integers(1, 3), st.integers(0, 4), st.integers(0, 6), st.integers(0, 2**32 - 1))
def test_bursty_generator_conforms(n, B, extra, lam, seed):
    W = B + 1 + extra
    lam = min(lam, n)
    pat = bursty_stragglers(numpy_rng(seed), n, 40, B, W, lam, p_start=0.3, p_continue=0.9)
    assert satisfies_bursty_model(pat, B, W, lam)


def test_order_statistics_and_mu_rule():
    times = np.array([[1.0, 5.0, 2.0, 3.0], [4.0, 1.0, 1.05, 9.0]])
    np.testing.assert_array_equal(uncoded_round_times(times), [5.0, 9.0])
    np.testing.assert_array_equal(gc_round_times(times, 1), [3.0, 4.0])
    np.testing.assert_array_equal(gc_round_times(times, 0), [5.0, 9.0])
    np.testing.assert_array_equal(stragglers_from_times(times, 0.1),
                                  [[False, True, True, True], [True, False, False, True]])


def test_sequential_round_times_wait_rule():
    sch = MultiplexedSGC(4, 1, 3, 1, num_jobs=1)
    times = np.array([[1.0, 1.05, 3.0, 1.0],        # one straggler: within the model
                      [1.0, 5.0, 6.0, 1.0],         # two stragglers > lambda: wait for all
                      [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(sequential_round_times(times, sch, 0.1), [1.1, 6.0, 1.0])


def test_simulated_wallclock_orders_schemes():
    n, B, W, lam, jobs = 12, 1, 3, 2, 60
    pattern = bursty_stragglers(numpy_rng(3, "p"), n, jobs + W - 2 + B, B, W, lam, p_start=0.1, p_continue=0.5)
    model = ComputeTimeModel(base_time=12.0, jitter=0.02, straggler_delay=10.0)
    out = simulate_wallclock(numpy_rng(3, "t"), pattern, model, s=lam, B=B, W=W, lam=lam, mu=0.2)
    assert set(out) == {"uncoded", "gc", "sr-sgc", "m-sgc"}
    assert out["gc"]["total"] < out["uncoded"]["total"]
    assert out["m-sgc"]["load"] < out["sr-sgc"]["load"] <= out["gc"]["load"]
    assert len(out["m-sgc"]["round_times"]) == jobs + W - 2 + B
    assert out["m-sgc"]["total"] < out["uncoded"]["total"]
    again = simulate_wallclock(numpy_rng(3, "t"), pattern, model, s=lam, B=B, W=W, lam=lam, mu=0.2)
    assert again["m-sgc"]["total"] == out["m-sgc"]["total"]
    quiet = simulate_wallclock(numpy_rng(0), np.zeros((10, 4), bool), ComputeTimeModel(4.0, 0.0, 1.0),
                               s=1, B=1, W=2, lam=1, num_jobs=9)
    np.testing.assert_allclose(quiet["uncoded"]["round_times"], 1.0)
    np.testing.assert_allclose(quiet["gc"]["round_times"], 2.0)
