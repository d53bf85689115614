"""DP mechanisms (``fedsim.privacy.mechanisms``): state round trips and what a round records."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.privacy.counters import make_counter
from fedsim.privacy.mechanisms import ClientLevelMechanism, CounterMechanism, DPFTRLMechanism, RoundOutcome


def _outcome(pids, classes=3):
    return RoundOutcome(sampled=list(pids), participants=list(pids),
                        metrics={p: {"label-counts": [p % 2, 1, 0][:classes]} for p in pids})


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["tree", "honaker", "sqrt"]), before=st.integers(1, 6), after=st.integers(1, 6),
       shape=st.sampled_from([(), (3,)]))
def test_counter_mechanism_resumes_bit_identically(kind, before, after, shape):
    horizon = before + after
    rounds = [_outcome(range(r % 4 + 1)) for r in range(horizon)]

    def make():
        return CounterMechanism("c", kind, horizon, 0.5, np.random.default_rng(7), shape=shape)

    straight = make()
    for r, o in enumerate(rounds):
        straight.record(r + 1, o)
    first = make()
    for r, o in enumerate(rounds[:before]):
        first.record(r + 1, o)
    resumed = CounterMechanism("c", kind, horizon, 0.5, np.random.default_rng(999), shape=shape)
    resumed.load_state_dict(first.state_dict())
    for r, o in enumerate(rounds[before:]):
        resumed.record(before + r + 1, o)
    assert resumed.released == straight.released


@pytest.mark.parametrize("kind", ["tree", "honaker", "sqrt"])
def test_counter_state_round_trip_continues_the_same_noise(kind):
    a = make_counter(kind, 8, 0.5, shape=(2,), rng=np.random.default_rng(1))
    for _ in range(3):
        a.update(np.ones(2))
    b = make_counter(kind, 8, 0.5, shape=(2,), rng=np.random.default_rng(2))
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        np.testing.assert_array_equal(a.update(np.ones(2)), b.update(np.ones(2)))


def test_participation_counter_adds_the_exact_count_to_the_noise():
    m = CounterMechanism("counter/participation", "tree", 4, 1e12, np.random.default_rng(0))
    m.record(1, _outcome([0, 1, 2]))
    m.record(2, _outcome([3]))
    assert m.released == pytest.approx(4.0, abs=1e-3)


def test_label_histogram_sums_label_counts_of_participants_only():
    m = CounterMechanism("counter/label_histogram", "tree", 4, 1e12, np.random.default_rng(0), shape=(3,))
    o = RoundOutcome(sampled=[0, 1, 2], participants=[0, 2],
                     metrics={0: {"label-counts": [1, 2, 3]}, 1: {"label-counts": [9, 9, 9]},
                              2: {"label-counts": [0, 1, 0]}})
    m.record(1, o)
    assert m.released == pytest.approx([1, 3, 3], abs=1e-3)


def test_client_level_mechanism_samples_with_the_rate_it_accounts():
    m = ClientLevelMechanism(1.0, "poisson", 0.3, 3, 10_000)
    taken = m.poisson_sample(np.random.default_rng(0))
    assert taken.shape == (10_000,)
    assert abs(taken.mean() - m.event.sample_rate) < 0.02


def test_dp_ftrl_mechanism_counts_epochs_not_rounds():
    m = DPFTRLMechanism(1.0, rounds_per_epoch=3)
    assert m.rho(1) == m.rho(3) < m.rho(4)
    assert m.epsilon(1e-5) == 0.0
    nxt = m.epsilon_next(1, 1e-5)
    m.record(1, RoundOutcome([], []))
    assert m.epsilon(1e-5) == nxt
    again = DPFTRLMechanism(1.0, rounds_per_epoch=3)
    again.load_state_dict(m.state_dict())
    assert again.epsilon(1e-5) == m.epsilon(1e-5)
