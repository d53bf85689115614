"""Straggler models and the simulated wall-clock; also the offline clock comparison of
``bench/compare_coded.py`` (``simulate_wallclock``), which is built on them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.errors import ConfigError
from fedsim.rng import numpy_rng
from fedsim.strategies.sequential_coded_math import MultiplexedSGC
from fedsim.strategies.stragglers_math import (
    ComputeTimeModel,
    bernoulli_stragglers,
    bursty_stragglers,
    draw_stragglers,
    follows_bursty_model,
    gilbert_elliott_stragglers,
    satisfies_bursty_model,
    stragglers_from_times,
)


def _load_bench(name: str):
    """A script under ``bench/`` (not a package) as a module."""
    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare_coded = _load_bench("compare_coded")


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


def test_draw_stragglers_names_the_generators():
    kw = {"p": 0.3, "p_good_to_bad": 0.2, "p_bad_to_good": 0.4, "B": 2, "W": 4, "lam": 2, "p_start": 0.3,
          "p_continue": 0.6}
    expected = {
        "bernoulli": lambda rng: bernoulli_stragglers(rng, 6, 20, 0.3),
        "gilbert_elliott": lambda rng: gilbert_elliott_stragglers(rng, 6, 20, 0.2, 0.4),
        "bursty": lambda rng: bursty_stragglers(rng, 6, 20, 2, 4, 2, 0.3, 0.6),
    }
    for kind, make in expected.items():
        np.testing.assert_array_equal(draw_stragglers(kind, numpy_rng(5, kind), 6, 20, **kw), make(numpy_rng(5, kind)))
    none = draw_stragglers("none", numpy_rng(5), 6, 20, **kw)
    assert none.shape == (20, 6) and not none.any()
    with pytest.raises(ConfigError):
        draw_stragglers("weibull", numpy_rng(5), 6, 20)


def test_time_model_takes_one_load_per_worker():
    model = ComputeTimeModel(base_time=2.0, jitter=0.0, straggler_delay=3.0, overhead=0.5)
    noise = model.noise(numpy_rng(0), 2, 3)
    strag = np.array([[0, 1, 0], [0, 0, 0]], bool)
    np.testing.assert_allclose(model.times(0.25, strag, noise), [[1.0, 4.0, 1.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(model.times(np.array([0.25, 0.5, 1.0]), strag[0], noise[0]), [1.0, 4.5, 2.5])


def test_order_statistics_and_mu_rule():
    times = np.array([[1.0, 5.0, 2.0, 3.0], [4.0, 1.0, 1.05, 9.0]])
    np.testing.assert_array_equal(compare_coded.uncoded_round_times(times), [5.0, 9.0])
    np.testing.assert_array_equal(compare_coded.gc_round_times(times, 1), [3.0, 4.0])
    np.testing.assert_array_equal(compare_coded.gc_round_times(times, 0), [5.0, 9.0])
    np.testing.assert_array_equal(stragglers_from_times(times, 0.1),
                                  [[False, True, True, True], [True, False, False, True]])


def test_sequential_round_times_wait_rule():
    sch = MultiplexedSGC(4, 1, 3, 1, num_jobs=1)
    times = np.array([[1.0, 1.05, 3.0, 1.0],        # one straggler: within the model
                      [1.0, 5.0, 6.0, 1.0],         # two stragglers > lambda: wait for all
                      [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(compare_coded.sequential_round_times(times, sch, 0.1), [1.1, 6.0, 1.0])


def test_simulated_wallclock_orders_schemes():
    n, B, W, lam, jobs = 12, 1, 3, 2, 60
    pattern = bursty_stragglers(numpy_rng(3, "p"), n, jobs + W - 2 + B, B, W, lam, p_start=0.1, p_continue=0.5)
    model = ComputeTimeModel(base_time=12.0, jitter=0.02, straggler_delay=10.0)
    out = compare_coded.simulate_wallclock(numpy_rng(3, "t"), pattern, model, s=lam, B=B, W=W, lam=lam, mu=0.2)
    assert set(out) == {"uncoded", "gc", "sr-sgc", "m-sgc"}
    assert out["gc"]["total"] < out["uncoded"]["total"]
    assert out["m-sgc"]["load"] < out["sr-sgc"]["load"] <= out["gc"]["load"]
    assert len(out["m-sgc"]["round_times"]) == jobs + W - 2 + B
    assert out["m-sgc"]["total"] < out["uncoded"]["total"]
    again = compare_coded.simulate_wallclock(numpy_rng(3, "t"), pattern, model, s=lam, B=B, W=W, lam=lam, mu=0.2)
    assert again["m-sgc"]["total"] == out["m-sgc"]["total"]
    quiet = compare_coded.simulate_wallclock(numpy_rng(0), np.zeros((10, 4), bool), ComputeTimeModel(4.0, 0.0, 1.0),
                               s=1, B=1, W=2, lam=1, num_jobs=9)
    np.testing.assert_allclose(quiet["uncoded"]["round_times"], 1.0)
    np.testing.assert_allclose(quiet["gc"]["round_times"], 2.0)


def test_offline_table_runs(capsys):
    compare_coded.offline({"s": 1, "B": 1, "W": 3, "lam": 1, "stragglers": "bursty", "p_start": 0.3}, n=6, jobs=8,
                          seeds=[0, 1])
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in ("uncoded", "gc", "sr-sgc", "m-sgc"))
