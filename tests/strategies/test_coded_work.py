"""coded_gd's work layout without Flower: pieces, every worker's mini-tasks, the end of a round on
the simulated clock, and decoding a job back to the sum of every piece's gradient."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.errors import AggregationError, ConfigError
from fedsim.rng import numpy_rng
from fedsim.strategies.coded_work import (
    Work,
    WorkLayout,
    end_gc_round,
    end_sequential_round,
    make_work_layout,
    row_ranges,
)
from fedsim.strategies.coded_math import make_code
from fedsim.strategies.sequential_coded_math import MultiplexedSGC, SelectiveRepeatSGC
from fedsim.strategies.stragglers_math import bursty_stragglers

DIM = 3


def layout_of(sizes, sequential="none", s=1, scheme="cyclic", B=1, W=3, lam=1, rounds=12, seed=0) -> WorkLayout:
    return make_work_layout(sizes, scheme=scheme, s=s, sequential=sequential, B=B, W=W, lam=lam, rounds=rounds,
                            seed=seed)


def coded_result(layout: WorkLayout, w: Work, grads: np.ndarray) -> np.ndarray:
    """What a worker returns for ``w`` when piece ``j``'s gradient is ``grads[j]``."""
    return sum((coef * grads[p] for p, coef in w.terms), np.zeros(DIM))


def assert_contiguous_cover(pieces, total):
    assert pieces[0][0] == 0 and pieces[-1][1] == total
    assert all(a <= b for a, b in pieces)
    assert all(pieces[k][1] == pieces[k + 1][0] for k in range(len(pieces) - 1))


def test_row_ranges():
    assert row_ranges([3, 0, 2]) == [(0, 3), (3, 3), (3, 5)]
    assert row_ranges([]) == []


# ------------------------------------------------------------------------------------ GC
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=2, max_size=9), st.data())
def test_gc_work_is_the_code(sizes, data):
    """Every worker computes exactly its code row over the shards; every shard is computed by
    ``s + 1`` workers; the loads and the client's task list follow the pieces."""
    n = len(sizes)
    s = data.draw(st.integers(0, n - 1))
    scheme = data.draw(st.sampled_from(["cyclic", "fractional"] if n % (s + 1) == 0 else ["cyclic"]))
    lay = layout_of(sizes, s=s, scheme=scheme)
    assert lay.pieces == lay.shard_pieces == row_ranges(sizes) and lay.total == sum(sizes)
    assert lay.T == 0 and lay.nominal_load == pytest.approx((s + 1) / n)
    work = lay.round_work(5)
    assert sorted(work) == list(range(n))
    holders = np.zeros(n, dtype=int)
    for i, (w,) in work.items():
        assert (w.job, w.kind, w.index) == (5, "gc", 0)
        assert [p for p, _ in w.terms] == lay.code.partitions_of(i)
        assert [c for _, c in w.terms] == [float(lay.code.B[i, j]) for j in lay.code.partitions_of(i)]
        holders[[p for p, _ in w.terms]] += 1
        assert lay.samples([w]) == sum(sizes[p] for p, _ in w.terms)
        assert lay.task_list([w]) == [[5, [[p, *lay.shard_pieces[p], c] for p, c in w.terms]]]
    assert (holders == s + 1).all()


def test_gc_round_waits_for_the_first_n_minus_s():
    lay = layout_of([10] * 6, s=2)
    grads = np.random.default_rng(0).normal(size=(6, DIM))
    coded = {i: coded_result(lay, w, grads) for i, (w,) in lay.round_work(0).items()}
    times = {0: 1.0, 1: 5.0, 2: 2.0, 3: 3.0, 4: 9.0, 5: 4.0}
    strag = np.array([0, 1, 0, 0, 1, 0], bool)
    end = end_gc_round(lay, 1, coded, times, strag, "wait")
    assert end.used == [0, 2, 3, 5] and end.round_time == 4.0 and not end.errors
    assert end.late == {1: "not waited for (round 1 closed at 4.000 s)", 4: "not waited for (round 1 closed at "
                        "4.000 s)"}
    (job, g), = end.grads
    assert job == 0 and np.allclose(g, grads.sum(axis=0))
    amp = end.metrics.pop("decode-amplification")            # how much decoding magnified round-off
    assert amp == lay.code.amplification_of([0, 2, 3, 5]) and 1.0 < amp <= lay.code.amplification
    assert end.metrics == {"decoded": 1, "waited-stragglers": 0}


def test_gc_round_more_than_s_stragglers_wait_or_skip():
    lay = layout_of([10] * 5, s=1)
    grads = np.random.default_rng(1).normal(size=(5, DIM))
    coded = {i: coded_result(lay, w, grads) for i, (w,) in lay.round_work(0).items()}
    times = {0: 1.0, 1: 7.0, 2: 2.0, 3: 8.0, 4: 3.0}
    strag = np.array([0, 1, 0, 1, 0], bool)
    waited = end_gc_round(lay, 1, coded, times, strag, "wait")
    assert waited.used == [0, 2, 4, 1] and waited.round_time == 7.0 and waited.late == {3: waited.late[3]}
    assert waited.metrics["waited-stragglers"] == 1 and np.allclose(waited.grads[0][1], grads.sum(axis=0))
    skipped = end_gc_round(lay, 1, coded, times, strag, "skip")
    assert skipped.used == [] and skipped.grads == [] and skipped.round_time == 3.0
    assert skipped.late == {1: "round skipped", 3: "round skipped"}
    assert skipped.metrics == {"aggregation-failed": 1, "decoded": 0, "waited-stragglers": 0}
    assert "2 stragglers > s = 1" in skipped.errors[0]


def test_gc_round_missing_replies_never_give_a_wrong_gradient():
    lay = layout_of([10] * 6, s=1)                      # cyclic: 2 missing workers > s cannot decode
    grads = np.ones((6, DIM))
    coded = {i: coded_result(lay, w, grads) for i, (w,) in lay.round_work(0).items() if i > 1}
    end = end_gc_round(lay, 1, coded, {i: 1.0 + i for i in range(6)}, np.zeros(6, bool), "wait")
    assert end.grads == [] and end.used == [] and end.errors and end.metrics["aggregation-failed"] == 1


# ------------------------------------------------------------------------------------ sequential
@settings(max_examples=25, deadline=None)
@given(st.integers(2, 7), st.integers(1, 3), st.integers(0, 3), st.data())
def test_msgc_pieces_are_the_data_fractions(n, B, extra, data):
    W = B + 1 + extra
    lam = data.draw(st.integers(0, n - 1))
    sizes = data.draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
    lay = layout_of(sizes, "m-sgc", B=B, W=W, lam=lam, rounds=W + B + 2)
    fr = lay.sched.data_fractions()
    exact = np.array([fr["d1_chunk"]] * (n * (W - 1)) + [fr["d2_group"] / n] * (B * n)) * sum(sizes)
    assert len(lay.pieces) == n * (W - 1 + B)
    if sum(sizes):
        assert_contiguous_cover(lay.pieces, sum(sizes))
    got = np.array([b - a for a, b in lay.pieces])
    assert np.all(np.abs(got - exact) < 1.0 + 1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 7), st.integers(1, 2), st.integers(0, 2), st.integers(1, 3), st.sampled_from(["sr-sgc", "m-sgc"]),
       st.integers(0, 2**16))
def test_every_job_decodes_to_the_full_gradient(n, B, x, lam, scheme, seed):
    """Drive a layout through a run with bursty stragglers (slow = 10 s, others 1 s): every job
    decodes, once, by its deadline, to the sum of every piece's gradient at its own model."""
    W = B * (x + 1) + 1                                    # B | (W - 1): both schemes apply
    lam = min(lam, n - 1)
    jobs = 6
    T = B if scheme == "sr-sgc" else W - 2 + B
    lay = layout_of([7 + (i % 3) for i in range(n)], scheme, B=B, W=W, lam=lam, rounds=jobs + T, seed=seed)
    assert isinstance(lay.sched, SelectiveRepeatSGC if scheme == "sr-sgc" else MultiplexedSGC) and lay.T == T
    rng = np.random.default_rng(seed)
    grads = {job: rng.normal(size=(len(lay.pieces), DIM)) for job in range(jobs)}   # one model per job
    pattern = bursty_stragglers(numpy_rng(seed, "pattern"), n, jobs + T, B, W, lam, p_start=0.4)
    results: dict = {}
    decoded = {}
    for r in range(jobs + T):
        work = lay.round_work(r)
        active = [p for p in range(n) if work[p]]
        assert all(w.job in grads and r - T <= w.job <= r for p in active for w in work[p])
        coded = {p: [coded_result(lay, w, grads[w.job]) for w in work[p]] for p in active}
        times = {p: 10.0 if pattern[r, p] else 1.0 for p in active}
        end = end_sequential_round(lay, r + 1, coded, work, times, 0.5, results, DIM)
        assert not end.errors
        for job, g in end.grads:
            assert job not in decoded and r - T <= job <= r
            decoded[job] = g
    assert sorted(decoded) == list(range(jobs))
    for job, g in decoded.items():
        np.testing.assert_allclose(g, grads[job].sum(axis=0), atol=1e-9)


def test_sequential_missing_result_is_an_aggregation_error():
    lay = layout_of([5] * 4, "sr-sgc", B=1, W=3, lam=1, rounds=4)
    results: dict = {}
    work = lay.round_work(0)
    coded = {p: [np.ones(DIM) for _ in work[p]] for p in range(4) if p != 2}   # worker 2 crashed
    end = end_sequential_round(lay, 1, coded, work, {p: 1.0 for p in range(4)}, 0.1, results, DIM)
    assert end.late == {} and end.used == [0, 1, 3]
    assert end.flags.tolist() == [False, False, True, False]      # a missing reply counts as a straggler
    with pytest.raises(AggregationError, match="missing"):
        lay.decode(0, {}, DIM)
    with pytest.raises(TypeError):
        layout_of([5] * 4).decode(0, results, DIM)


def test_round_work_checks_the_scheduler_is_in_step():
    lay = layout_of([5] * 4, "m-sgc", B=1, W=3, lam=1, rounds=6)
    lay.round_work(0)
    with pytest.raises(AggregationError, match="out of step"):
        lay.round_work(1)


@pytest.mark.parametrize("kw, key", [
    ({"s": 4}, "strategy.s"),
    ({"s": 2, "scheme": "fractional"}, "strategy.scheme"),
    ({"sequential": "sr-sgc", "lam": 4}, "strategy.lam"),
    ({"sequential": "sr-sgc", "B": 2, "W": 4}, "strategy.B"),
    ({"sequential": "m-sgc", "W": 4, "rounds": 3}, "run.rounds"),
])
def test_impossible_layouts_are_config_errors(kw, key):
    with pytest.raises(ConfigError) as err:
        layout_of([5] * 4, **kw)
    assert err.value.key == key


def test_gradient_code_is_seeded():
    a, b = layout_of([5] * 6, s=2, seed=4), layout_of([5] * 6, s=2, seed=4)
    np.testing.assert_array_equal(a.code.B, b.code.B)
    np.testing.assert_array_equal(a.code.B, make_code(6, 2, "cyclic", numpy_rng(4, "gradient-code")).B)


def test_a_code_too_ill_conditioned_to_be_exact_is_refused(monkeypatch):
    import fedsim.strategies.coded_work as coded_work

    amp = layout_of([5] * 6, s=2, seed=4).code.amplification
    assert 1.0 < amp < coded_work.MAX_AMPLIFICATION
    monkeypatch.setattr(coded_work, "MAX_AMPLIFICATION", amp / 2)
    with pytest.raises(ConfigError, match="amplification") as err:
        layout_of([5] * 6, s=2, seed=4)
    assert err.value.key == "strategy.s"
    assert layout_of([5] * 6, s=2, scheme="fractional").code.amplification == pytest.approx(1.0)   # never refused
