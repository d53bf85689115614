"""Sequential gradient coding schedulers (spec section 4b tests (1)-(4) plus numeric decoding)."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.errors import AggregationError, ConfigError
from fedsim.rng import numpy_rng
from fedsim.strategies.coded_math import make_code
from fedsim.strategies.sequential_coded_math import MultiplexedSGC, SelectiveRepeatSGC
from fedsim.strategies.stragglers_math import bursty_stragglers, satisfies_bursty_model

PARAMS = [(8, 1, 3, 2), (8, 2, 5, 3), (10, 3, 7, 4), (6, 1, 2, 2), (12, 2, 3, 5), (6, 2, 3, 6), (5, 1, 5, 5)]


def conforming_pattern(n, B, W, lam, rounds, seed):
    pat = bursty_stragglers(numpy_rng(seed, "sgc", n, B, W, lam), n, rounds, B, W, lam, p_start=0.25, p_continue=0.8)
    assert satisfies_bursty_model(pat, B, W, lam)
    return pat


def test_loads_match_the_paper_example():
    n, B, W, lam = 256, 3, 7, 16
    assert (lam + 1) / n == pytest.approx(0.0664, abs=5e-5)                     # GC with s = lambda
    assert SelectiveRepeatSGC.normalized_load(n, B, W, lam) == pytest.approx(0.0273, abs=5e-5)
    assert MultiplexedSGC.normalized_load(n, B, W, lam) == pytest.approx(0.00569, abs=5e-6)
    assert SelectiveRepeatSGC(n, B, W, lam).T == 3 and MultiplexedSGC(n, B, W, lam).T == 8
    assert MultiplexedSGC.normalized_load(4, 2, 5, 4) == pytest.approx((5 - 1 + 2) / (4 * 4))


@pytest.mark.parametrize("n,B,W,lam", [(8, 2, 5, 3), (6, 1, 4, 6), (256, 3, 7, 16)])
def test_msgc_data_fractions_partition_the_job(n, B, W, lam):
    sch = MultiplexedSGC(n, B, W, lam)
    f = sch.data_fractions()
    assert n * (W - 1) * f["d1_chunk"] + B * f["d2_group"] == pytest.approx(1.0)
    assert (W - 1 + B) * f["d1_chunk"] == pytest.approx(sch.load)           # equal-sized mini-tasks


@pytest.mark.parametrize("n,B,W,lam", PARAMS)
def test_conforming_patterns_always_decode_by_the_deadline(n, B, W, lam):
    repeats = {"SelectiveRepeatSGC": 0, "MultiplexedSGC": 0}
    for seed in range(6):
        jobs = 40
        pat = conforming_pattern(n, B, W, lam, jobs + W - 2 + B, seed)
        schemes = [MultiplexedSGC(n, B, W, lam, num_jobs=jobs, fallback="raise")]
        if (W - 1) % B == 0:
            schemes.append(SelectiveRepeatSGC(n, B, W, lam, num_jobs=jobs, fallback="raise"))
        for sch in schemes:
            reports = sch.run(pat[:sch.total_rounds])
            assert not any(r.waited_for_all for r in reports)
            assert sorted(sch.decodable_at) == list(range(jobs))
            assert all(t <= r <= t + sch.T for t, r in sch.decodable_at.items())
            repeats[type(sch).__name__] += sum(t.repeat for r in reports for w in r.tasks for t in w)
        # GC designed for s = lambda is decodable under the same patterns: <= lambda stragglers per round
        assert pat.sum(axis=1).max() <= lam
    assert repeats["MultiplexedSGC"] > 0 and (repeats["SelectiveRepeatSGC"] > 0 or (W - 1) % B)


def test_no_stragglers_decode_times_and_task_layout():
    sr = SelectiveRepeatSGC(5, 2, 5, 3, num_jobs=6)
    reports = sr.run(np.zeros((sr.total_rounds, 5), bool))
    assert sr.decodable_at == {t: t for t in range(6)}
    assert all(len(t) == 1 and t[0].job == 0 for t in reports[0].tasks)
    ms = MultiplexedSGC(5, 2, 4, 2, num_jobs=6)
    reports = ms.run(np.zeros((ms.total_rounds, 5), bool))
    assert ms.decodable_at == {t: t + ms.T for t in range(6)}
    full = reports[ms.T].tasks[0]                     # a round where every slot is busy
    assert len(full) == ms.slots and [t.job for t in full] == [ms.T - m for m in range(ms.slots)]
    assert [t.kind for t in full] == ["d1"] * 3 + ["d2"] * 2
    assert [ms.job_exists(j) for j in (-1, 0, 5, 6)] == [False, True, True, False]
    assert MultiplexedSGC(5, 2, 4, 2).job_exists(10**6)               # an endless stream


def test_selective_repetition_redoes_missing_tasks():
    n, B, W, lam = 6, 1, 3, 4                        # s = ceil(1*4/3) = 2
    sr = SelectiveRepeatSGC(n, B, W, lam, num_jobs=3, fallback="raise")
    assert sr.s == 2
    first = np.array([1, 1, 1, 1, 0, 0], bool)       # 4 stragglers > s in round 0
    sr.step(first)
    tasks = sr.tasks()
    repeats = [i for i, t in enumerate(tasks) if t and t[0].repeat]
    assert len(repeats) == 2 and all(tasks[i][0].job == 0 for i in repeats)
    sr.step(np.zeros(n, bool))
    assert sr.decodable_at[0] == 1 and len(sr.received(0)) == 4


def test_msgc_repeats_missing_d1_chunks():
    ms = MultiplexedSGC(4, 1, 3, 1, num_jobs=2, fallback="raise")   # slots: d1 chunk 0, d1 chunk 1, d2 group 0
    ms.step(np.array([1, 0, 0, 0], bool))            # worker 0 misses chunk 0 of job 0
    ms.step(np.zeros(4, bool))
    tasks = ms.tasks()[0]
    job0 = [t for t in tasks if t.job == 0][0]
    assert job0.kind == "d1" and job0.index == 0 and job0.repeat
    ms.step(np.zeros(4, bool))
    assert ms.is_decodable(0) and ms.decodable_at[0] == 2
    assert ms.received(0)["d2"][0] == [1, 2, 3]


def test_breaking_the_model_waits_for_all_or_raises():
    pattern = np.zeros((6, 4), bool)
    pattern[2, :3] = True                            # 3 stragglers > lambda = 1
    sch = MultiplexedSGC(4, 1, 3, 1, num_jobs=4)
    reports = sch.run(pattern)
    assert reports[2].waited_for_all and not reports[2].stragglers.any()
    assert reports[2].observed_stragglers.sum() == 3
    assert sorted(sch.decodable_at) == [0, 1, 2, 3]
    with pytest.raises(AggregationError):
        MultiplexedSGC(4, 1, 3, 1, num_jobs=4, fallback="raise").run(pattern)
    sr = SelectiveRepeatSGC(4, 1, 3, 1, num_jobs=4)
    burst = np.zeros((6, 4), bool)
    burst[1, 0] = burst[2, 0] = True                 # burst of length 2 > B = 1
    reports = sr.run(burst)
    assert not reports[1].waited_for_all and reports[2].waited_for_all


@pytest.mark.parametrize("seed", range(3))
def test_numeric_decoding_equals_true_job_gradients(seed):
    """Feed real partial gradients through the schedules and decode every job exactly."""
    n, B, W, lam, jobs, d = 7, 2, 5, 3, 12, 4
    rng = numpy_rng(seed, "numeric")
    pat = conforming_pattern(n, B, W, lam, jobs + W - 2 + B, seed)

    sr = SelectiveRepeatSGC(n, B, W, lam, num_jobs=jobs, fallback="raise")
    code = make_code(n, sr.s, "cyclic", rng)
    parts = rng.standard_normal((jobs, n, d))       # job t, partition j
    sent: dict[int, dict[int, np.ndarray]] = {}
    for r in range(sr.total_rounds):
        rep = sr.step(pat[r])
        for i, tasks in enumerate(rep.tasks):
            if not rep.stragglers[i]:
                for t in tasks:
                    sent.setdefault(t.job, {})[i] = code.encode(i, parts[t.job])
        for t in rep.newly_decodable:
            workers = sr.received(t)
            np.testing.assert_allclose(code.decode(workers, sent[t]), parts[t].sum(axis=0), atol=1e-9)
    assert len(sr.decodable_at) == jobs

    ms = MultiplexedSGC(n, B, W, lam, num_jobs=jobs, fallback="raise")
    d2code = make_code(n, lam, "cyclic", rng)
    d1 = rng.standard_normal((jobs, n, W - 1, d))   # chunk c of worker i
    d2 = rng.standard_normal((jobs, B, n, d))       # group g, partition j
    got_d1 = np.zeros((jobs, n, W - 1, d))
    got_d2: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    for r in range(ms.total_rounds):
        rep = ms.step(pat[r])
        for i, tasks in enumerate(rep.tasks):
            if rep.stragglers[i]:
                continue
            for t in tasks:
                if t.kind == "d1":
                    got_d1[t.job, i, t.index] = d1[t.job, i, t.index]
                else:
                    got_d2.setdefault((t.job, t.index), {})[i] = d2code.encode(i, d2[t.job, t.index])
        for t in rep.newly_decodable:
            rec = ms.received(t)
            total = got_d1[t].sum(axis=(0, 1))
            for g in range(B):
                total = total + d2code.decode(rec["d2"][g], got_d2[(t, g)])
            np.testing.assert_allclose(total, d1[t].sum(axis=(0, 1)) + d2[t].sum(axis=(0, 1)), atol=1e-9)
    assert len(ms.decodable_at) == jobs


def test_state_dict_resume_gives_identical_run():
    n, B, W, lam = 6, 1, 3, 2
    pat = conforming_pattern(n, B, W, lam, 30, 5)
    for cls in (SelectiveRepeatSGC, MultiplexedSGC):
        full = cls(n, B, W, lam, num_jobs=28)
        ref = full.run(pat)
        first = cls(n, B, W, lam, num_jobs=28)
        first.run(pat[:13])
        resumed = cls(n, B, W, lam, num_jobs=28)
        resumed.load_state_dict(first.state_dict())
        rest = resumed.run(pat[13:])
        assert [r.tasks for r in rest] == [r.tasks for r in ref[13:]]
        assert resumed.decodable_at == full.decodable_at


def test_config_errors():
    with pytest.raises(ConfigError):
        SelectiveRepeatSGC(6, 2, 4, 2)                 # B does not divide W - 1
    with pytest.raises(ConfigError):
        MultiplexedSGC(6, 3, 3, 2)                     # W < B + 1
    with pytest.raises(ConfigError):
        MultiplexedSGC(6, 1, 3, 2, fallback="ignore")
