"""Work layout of ``coded_gd`` (:mod:`fedsim.strategies.coded`): which rows of the data every
worker computes in a round and with which code coefficients (:class:`WorkLayout`), how a round
ends on the simulated clock (:func:`end_gc_round`, :func:`end_sequential_round`), and how a job's
gradient is decoded from the results (pure NumPy, no Flower, no torch).

The data is the concatenation of the clients' shards (``concat(federation.client_indices)``, ``N``
rows), cut into *pieces*, each a range of rows:

* GC and SR-SGC: the ``n`` shards themselves (piece ``j`` = client ``j``'s shard);
* M-SGC: ``n (W - 1)`` uncoded D1 chunks, then ``B`` D2 groups of ``n`` partitions each, sized by
  :meth:`~fedsim.strategies.sequential_coded_math.MultiplexedSGC.data_fractions` (largest remainder).

A worker's mini-task (:class:`Work`) is ``sum_j B_ij g_j`` over its pieces ``j`` at the model of
one job; ``g_j`` is the gradient of the SUMMED loss over piece ``j``, so the decoded sum over all
pieces is the gradient of the summed loss over all ``N`` rows.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsim.data.splits import largest_remainder
from fedsim.errors import AggregationError, ConfigError
from fedsim.rng import numpy_rng
from fedsim.strategies.coded_math import MAX_AMPLIFICATION, GradientCode, make_code
from fedsim.strategies.sequential_coded_math import MultiplexedSGC, SelectiveRepeatSGC
from fedsim.strategies.stragglers_math import stragglers_from_times

__all__ = ["RoundEnd", "Work", "WorkLayout", "end_gc_round", "end_sequential_round", "make_work_layout",
           "row_ranges"]

#: ``(job, kind, index, worker)`` -> the coded result a worker returned for that mini-task
Results = Mapping[tuple[int, str, int, int], np.ndarray]


@dataclass(frozen=True)
class Work:
    """One mini-task for one worker: ``sum_{(piece, coef) in terms} coef * g_piece`` at model ``job``.

    ``kind`` is ``"gc"`` (a GC / SR-SGC coded task), ``"d1"`` (M-SGC uncoded chunk ``index`` of the
    worker) or ``"d2"`` (the worker's coded task of M-SGC D2 group ``index``).
    """

    job: int
    kind: str
    index: int
    terms: tuple[tuple[int, float], ...]


def row_ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` row ranges of the given sizes, from row 0."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [(int(bounds[k]), int(bounds[k + 1])) for k in range(len(sizes))]


class WorkLayout:
    """The pieces of the data and every worker's mini-tasks, round by round.

    Parameters
    ----------
    shard_sizes
        Rows of every client's shard (``n`` workers = ``n`` clients).
    code
        The gradient code (GC: ``s``; SR-SGC: the scheduler's ``s``; M-SGC: ``lambda``).
    sched
        The sequential-GC scheduler, or ``None`` for plain GC (one job per round).
    """

    def __init__(self, shard_sizes: Sequence[int], code: GradientCode,
                 sched: SelectiveRepeatSGC | MultiplexedSGC | None = None) -> None:
        self.n = len(shard_sizes)
        self.code = code
        self.sched = sched
        self.total = int(sum(int(s) for s in shard_sizes))
        self.shard_pieces = row_ranges(shard_sizes)
        self.pieces = self.shard_pieces
        if isinstance(sched, MultiplexedSGC):
            fr = sched.data_fractions()
            weights = [fr["d1_chunk"]] * (self.n * (sched.W - 1)) + [fr["d2_group"] / self.n] * (sched.B * self.n)
            self.pieces = row_ranges(largest_remainder(self.total, weights, weight_sum=sum(weights)).tolist())

    @property
    def T(self) -> int:
        """Rounds a job may take to decode after the round it starts in (0 for plain GC)."""
        return 0 if self.sched is None else self.sched.T

    @property
    def nominal_load(self) -> float:
        """The design's fraction of the data one worker computes per round."""
        return self.code.load if self.sched is None else float(self.sched.load)

    # ------------------------------------------------------------------ pieces
    def piece_range(self, piece: int) -> tuple[int, int]:
        """The ``[start, stop)`` rows of ``piece`` in the concatenated shard order."""
        return self.pieces[piece]

    def samples(self, work: Sequence[Work]) -> int:
        """Rows a worker computes for ``work`` (counted once per term)."""
        return sum(b - a for w in work for p, _ in w.terms for a, b in [self.pieces[p]])

    def terms(self, worker: int, pieces: Sequence[int]) -> tuple[tuple[int, float], ...]:
        """``worker``'s coded combination over ``pieces`` (the code's ``n`` partitions)."""
        return tuple((pieces[j], float(self.code.B[worker, j])) for j in self.code.partitions_of(worker))

    # ------------------------------------------------------------------ tasks
    def round_work(self, r: int) -> dict[int, list[Work]]:
        """Every worker's mini-tasks in round ``r`` (0-based); asks the scheduler, which must be at ``r``."""
        n = self.n
        shards = list(range(n))
        if self.sched is None:
            return {i: [Work(r, "gc", 0, self.terms(i, shards))] for i in range(n)}
        if self.sched.round != r:
            raise AggregationError(f"sequential GC scheduler is at round {self.sched.round}, the run at {r}",
                                   "the strategy state is out of step; restart the run")
        d1 = self.sched.W - 1
        out: dict[int, list[Work]] = {}
        for i, tasks in enumerate(self.sched.tasks()):
            work = []
            for t in tasks:
                if t.kind == "gc":
                    work.append(Work(t.job, "gc", 0, self.terms(i, shards)))
                elif t.kind == "d1":
                    work.append(Work(t.job, "d1", t.index, ((i * d1 + t.index, 1.0),)))
                else:
                    base = n * d1 + t.index * n
                    work.append(Work(t.job, "d2", t.index, self.terms(i, [base + j for j in shards])))
            out[i] = work
        return out

    def task_list(self, work: Sequence[Work]) -> list[list[Any]]:
        """The client's view of ``work``: ``[[job, [[piece, start, stop, coef], ...]], ...]``."""
        return [[w.job, [[p, *self.piece_range(p), c] for p, c in w.terms]] for w in work]

    # ------------------------------------------------------------------ decoding
    def decode(self, job: int, results: Results, dim: int) -> np.ndarray:
        """``sum_j g_j`` of sequential job ``job`` (decodable per the scheduler) from the stored
        ``results``; :class:`AggregationError` if one it needs is missing (a crashed worker)."""
        def result(kind: str, index: int, worker: int) -> np.ndarray:
            key = (job, kind, index, worker)
            if key not in results:
                raise AggregationError(f"job {job}: the {kind} result {index} of worker {worker} is missing "
                                       "(the worker failed, it did not straggle); the job is dropped",
                                       "sequential GC tolerates stragglers, not crashed workers")
            return results[key]

        if isinstance(self.sched, SelectiveRepeatSGC):
            workers = self.sched.received(job)
            return self.code.decode(workers, [result("gc", 0, w) for w in workers])
        if not isinstance(self.sched, MultiplexedSGC):
            raise TypeError("decode() is for sequential GC; plain GC decodes the round's results directly")
        got = self.sched.received(job)
        total = np.zeros(dim)
        for i in range(self.n):
            for c in range(self.sched.W - 1):
                total += result("d1", c, i)
        for g, workers in enumerate(got["d2"]):
            total += self.code.decode(workers, [result("d2", g, w) for w in workers])
        return total


def _code(n: int, s: int, scheme: str, option: str, seed: int) -> GradientCode:
    if not 0 <= s < n:
        raise ConfigError(f"strategy.{option}", f"the code needs 0 <= s < n = {n} workers, got s = {s}")
    if scheme == "fractional" and n % (s + 1):
        raise ConfigError("strategy.scheme", f"fractional repetition needs (s + 1) | n, got s = {s}, n = {n}",
                          "use scheme = \"cyclic\", or an s with s + 1 dividing data.num_clients")
    code = make_code(n, s, scheme, numpy_rng(seed, "gradient-code"))
    if code.amplification > MAX_AMPLIFICATION:    # conditioning check (coded_math module docstring)
        raise ConfigError(f"strategy.{option}", f"the best of the cyclic codes drawn for n = {n}, s = {s} decodes "
                          f"with amplification {code.amplification:.3g} > {MAX_AMPLIFICATION:.3g}: its decoded "
                          "gradients would not be exact even from float64 messages",
                          "use scheme = \"fr\" (amplification 1), a smaller s, or another run.seed")
    return code


def make_work_layout(shard_sizes: Sequence[int], *, scheme: str, s: int, sequential: str, B: int, W: int,
                     lam: int, rounds: int, seed: int) -> WorkLayout:
    """The layout of ``coded_gd``'s options: GC (``sequential = "none"``, code for ``s``), SR-SGC or
    M-SGC (``(B, W, lam)``, ``rounds - T`` jobs); a :class:`ConfigError` names the key at fault."""
    n = len(shard_sizes)
    if sequential == "none":
        return WorkLayout(shard_sizes, _code(n, s, scheme, "s", seed))
    if lam >= n:
        raise ConfigError("strategy.lam", f"lam must be < n = {n} workers, got {lam}")
    cls = SelectiveRepeatSGC if sequential == "sr-sgc" else MultiplexedSGC
    if cls is SelectiveRepeatSGC and (W - 1) % B:
        raise ConfigError("strategy.B", f"SR-SGC needs B | (W - 1), got B = {B}, W = {W}",
                          "choose W = x * B + 1, or sequential = \"m-sgc\"")
    T = B if cls is SelectiveRepeatSGC else W - 2 + B
    if rounds <= T:
        raise ConfigError("run.rounds", f"{sequential} has delay T = {T}; the run needs more than {T} rounds",
                          f"set run.rounds >= {T + 1} (the last T rounds only finish pending jobs)")
    sched = cls(n, B, W, lam, num_jobs=rounds - T, fallback="wait")
    return WorkLayout(shard_sizes, _code(n, sched.s if isinstance(sched, SelectiveRepeatSGC) else lam, scheme,
                                         "lam", seed), sched)


# ---------------------------------------------------------------------------------------------
# the end of a round on the simulated clock
@dataclass
class RoundEnd:
    """How a round ended: who counted, when it closed, what decoded."""

    used: list[int]                        # replied workers whose results count
    round_time: float                      # simulated seconds the master waited
    flags: np.ndarray                      # (n,) bool: the worker straggled (drawn for GC, detected for SGC)
    late: dict[int, str] = field(default_factory=dict)   # replied workers not waited for -> why
    grads: list[tuple[int, np.ndarray]] = field(default_factory=list)   # (job, sum_j g_j), job order
    errors: list[str] = field(default_factory=list)      # aggregation failures of the round
    decoded_jobs: list[int] = field(default_factory=list)   # jobs the scheduler found decodable
    metrics: dict[str, float | int] = field(default_factory=dict)


def end_gc_round(layout: WorkLayout, server_round: int, coded: Mapping[int, np.ndarray],
                 times: Mapping[int, float], stragglers: np.ndarray, on_excess: str) -> RoundEnd:
    """Plain GC: decode from the first ``n - s`` results (``coded``: worker -> its result) in
    simulated-time order. More than ``s`` stragglers: ``"wait"`` waits for the fastest of them,
    ``"skip"`` leaves the step out (an error). ``times`` covers every worker that had work."""
    r, n, s = server_round - 1, layout.n, layout.code.s
    k = n - s
    arrivals = sorted(coded, key=lambda p: (times[p], p))
    if on_excess == "skip":
        arrivals = [p for p in arrivals if not stragglers[p]]
    used = arrivals[:k]
    grads: list[tuple[int, np.ndarray]] = []
    error: AggregationError | None = None
    if len(used) < k:
        round_time = max(times.values(), default=0.0) if on_excess == "wait" else \
            max((times[p] for p in arrivals), default=0.0)
        if on_excess == "skip":
            error = AggregationError(
                f"round {server_round}: only {len(used)} of the {k} coded results needed arrived without "
                f"waiting ({int(stragglers.sum())} stragglers > s = {s}, {n - len(coded)} missing replies); "
                "step skipped, model unchanged (on_excess = 'skip')",
                "raise strategy.s, or use on_excess = \"wait\" to wait for the fastest stragglers")
    else:
        round_time = times[used[-1]] if used else 0.0
    amplification = None
    if error is None:
        try:
            grads = [(r, layout.code.decode(used, [coded[p] for p in used]))]
            amplification = layout.code.amplification_of(used)
        except AggregationError as err:
            error = err
    end = RoundEnd(used, round_time, np.asarray(stragglers, dtype=bool))
    if error is not None:
        end.used = []
        end.errors.append(str(error))
        end.metrics["aggregation-failed"] = 1
    end.grads = grads
    end.metrics["decoded"] = int(bool(grads))
    if amplification is not None:
        end.metrics["decode-amplification"] = float(amplification)
    end.metrics["waited-stragglers"] = int(sum(1 for p in end.used if stragglers[p]))
    for p in coded:
        if p not in end.used and stragglers[p]:
            end.late[p] = "round skipped" if error else \
                f"not waited for (round {server_round} closed at {round_time:.3f} s)"
    return end


def end_sequential_round(layout: WorkLayout, server_round: int, coded: Mapping[int, Sequence[np.ndarray]],
                         work: Mapping[int, Sequence[Work]], times: Mapping[int, float], mu: float,
                         results: MutableMapping[tuple[int, str, int, int], np.ndarray], dim: int) -> RoundEnd:
    """Sequential GC: workers later than ``(1 + mu) x fastest`` (or with no reply) straggle, unless
    that breaks the scheduler's model (then it waits for everyone); the results of the workers
    waited for go to ``results``, and every job that became decodable is decoded from there.
    ``times`` covers exactly the workers that had work, in worker order."""
    assert layout.sched is not None
    r = server_round - 1
    active = list(times)
    tmin = min(times.values(), default=0.0)
    tmax = max(times.values(), default=0.0)
    observed = np.zeros(layout.n, dtype=bool)
    if active:
        slow = stragglers_from_times(np.array([times[p] for p in active]), mu)
        observed[active] = [bool(x) or p not in coded for p, x in zip(active, slow)]
    report = layout.sched.step(observed)
    round_time = tmax if report.waited_for_all else min((1.0 + mu) * tmin, tmax)
    end = RoundEnd([], round_time, observed, decoded_jobs=list(report.newly_decodable))
    for p, arrays in coded.items():
        if report.stragglers[p]:
            end.late[p] = f"later than (1 + mu) x fastest = {(1 + mu) * tmin:.3f} s; not waited for"
            continue
        end.used.append(p)
        for w, y in zip(work[p], arrays):
            results[(w.job, w.kind, w.index, p)] = y
    delay = []
    for job in sorted(report.newly_decodable):
        try:
            end.grads.append((job, layout.decode(job, results, dim)))
            delay.append(r - job)
        except AggregationError as err:
            end.errors.append(str(err))
            end.metrics["aggregation-failed"] = 1
    end.used.sort()
    end.metrics.update({"detected-stragglers": int(observed.sum()), "waited-for-all": int(report.waited_for_all),
                        "jobs-decoded": len(end.grads), "decode-delay": max(delay, default=0),
                        "decoded": int(bool(end.grads))})
    return end
