"""MaxSum / SumSelect under continual observation: T^(1/3) rate, error bounds, both branches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.errors import ConfigError
from fedsim.privacy.maxsum import (
    MaxSumRelease,
    block_error_bound,
    counters_error_bound,
    leader_switching_stream,
    maxsum_error,
    optimal_block_length,
    sumselect_error,
)


def test_leader_switching_stream_switches_leaders():
    stream = leader_switching_stream(64, 2)
    leaders = np.argmax(np.cumsum(stream, axis=0), axis=1)
    assert set(leaders) == {0, 1} and np.all(stream.sum(axis=1) == 1)
    assert np.sum(np.diff(leaders) != 0) >= 3


def test_maxsum_error_grows_like_T_to_the_one_third():
    rho, Ts = 0.5, [2**k for k in range(8, 17, 2)]
    errors = []
    for T in Ts:
        stream = leader_switching_stream(T)
        errors.append(np.mean([maxsum_error(stream, MaxSumRelease(T, 2, rho, branch="block",
                                                                  rng=np.random.default_rng(s)).release(stream))
                               for s in range(20)]))
    slope = np.polyfit(np.log(Ts), np.log(errors), 1)[0]
    assert 0.2 <= slope <= 0.5, slope
    k = [optimal_block_length(T, rho) for T in Ts]
    assert np.polyfit(np.log(Ts), np.log(k), 1)[0] == pytest.approx(1 / 3, abs=0.08)


@pytest.mark.parametrize("select", [False, True])
def test_block_error_stays_under_the_bound(select):
    T, rho, beta = 4096, 0.5, 0.05
    stream = leader_switching_stream(T)
    fails = 0
    for s in range(40):
        m = MaxSumRelease(T, 2, rho, branch="block", select=select, beta=beta, rng=np.random.default_rng(s))
        out = m.release(stream)
        err = sumselect_error(stream, out) if select else maxsum_error(stream, out)
        fails += err > block_error_bound(T, rho, m.block, beta, select, dim=2)
    assert fails <= 6  # expected <= beta * 40 = 2


@pytest.mark.parametrize("select", [False, True])
def test_counters_branch_error_under_the_bound(select):
    T, d, rho = 512, 3, 2.0
    stream = (np.random.default_rng(0).random((T, d)) < [0.5, 0.4, 0.3]).astype(float)
    m = MaxSumRelease(T, d, rho, branch="counters", select=select, rng=np.random.default_rng(1))
    out = m.release(stream)
    err = sumselect_error(stream, out) if select else maxsum_error(stream, out)
    assert err <= counters_error_bound(T, d, rho, select=select)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(2, 400), d=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_streaming_equals_batch_and_auto_branch(T, d, seed):
    stream = (np.random.default_rng(seed).random((T, d)) < 0.5).astype(float)
    for select in (False, True):
        a = MaxSumRelease(T, d, 1.0, select=select, rng=np.random.default_rng(seed))
        b = MaxSumRelease(T, d, 1.0, select=select, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(a.release(stream), np.array([b.update(x) for x in stream]))
    auto = MaxSumRelease(T, d, 1.0)
    bounds = {"counters": counters_error_bound(T, d, 1.0), "block": block_error_bound(T, 1.0, auto.block, dim=d)}
    assert bounds[auto.branch] == min(bounds.values())


def test_invalid_records_are_refused():
    m = MaxSumRelease(10, 2, 1.0, branch="block")
    with pytest.raises(ConfigError, match="0/1"):
        m.update(np.array([0.5, 0.0]))
    with pytest.raises(ConfigError):
        MaxSumRelease(10, 2, 1.0, branch="svt")
