"""Sequential gradient coding schedulers (pure Python/NumPy, no gradients inside).

Reference
---------
Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for Straggler Mitigation", ICLR 2023
(arXiv 2211.13802); authors' simulator mamaj/Sequential-Gradient-Coding-2
(``2_find_runtimes/selective_repeat_sgc.py``, ``multiplexed_sgc.py``). Spec:
``server-algorithms.md`` section 4b.

Jobs ``0, 1, ...`` (e.g. the gradients of consecutive rounds of several concurrently trained
models) start in round ``t`` and must be decodable by the end of round ``t + T``. Stragglers follow
the bursty ``(B, W, lambda)`` model (see :mod:`fedsim.strategies.stragglers_math`).

* :class:`SelectiveRepeatSGC` (SR-SGC, ``T = B``, needs ``B | (W - 1)``): every round each worker runs
  its gradient-coding task (``s = ceil(B lambda / (W - 1 + B))``, e.g. the cyclic code of
  :mod:`fedsim.strategies.coded_math`) for the new job. In round ``t + B``, if ``v > s`` workers
  did not return job ``t``'s task in round ``t``, ``v - s`` of them redo that task instead of the new
  one. Job ``t`` decodes from any ``n - s`` of its tasks received in rounds ``t`` and ``t + B``.
* :class:`MultiplexedSGC` (M-SGC, ``T = W - 2 + B``): a job's data is split into a D1 part
  (``n (W - 1)`` uncoded chunks, ``W - 1`` per worker) and a D2 part (``B`` groups, each coded across
  the workers with gradient coding for ``lambda`` stragglers). In round ``r`` a worker runs one
  mini-task for each job ``r - m``, ``m = 0 .. W - 2 + B``: slot ``m < W - 1`` is its D1 chunk ``m``;
  slot ``W - 1 + g`` is D2 group ``g`` if the worker has delivered all its D1 chunks of that job,
  otherwise it redoes its first missing D1 chunk. Job ``t`` decodes when every D1 chunk has arrived
  and every D2 group has ``>= n - lambda`` coded results.

Fallback (as the authors' simulator): when a round's straggler pattern breaks the design model the
master waits for every worker in that round (``fallback="wait"``, the round then has no stragglers);
``fallback="raise"`` raises :class:`~fedsim.errors.AggregationError` instead. A job that is not
decodable at its deadline raises :class:`~fedsim.errors.AggregationError` (impossible when the
effective pattern follows the model; it would signal a bug).

Each scheduler is used round by round: :meth:`tasks` gives what every worker computes in the current
round, :meth:`step` applies that round's straggler pattern and reports which jobs became decodable.
The caller decodes with :func:`fedsim.strategies.coded_math.decode` using :meth:`received`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsim.errors import AggregationError, ConfigError
from fedsim.strategies.stragglers_math import follows_bursty_model

__all__ = ["MultiplexedSGC", "RoundReport", "SelectiveRepeatSGC", "Task"]


@dataclass(frozen=True)
class Task:
    """One unit of work: ``kind`` is ``"gc"`` (SR-SGC coded task), ``"d1"`` (uncoded chunk ``index``)
    or ``"d2"`` (coded task of D2 group ``index``); ``repeat`` marks a redo of a missed task."""

    job: int
    kind: str
    index: int = 0
    repeat: bool = False


@dataclass
class RoundReport:
    """What happened in one round."""

    round: int
    tasks: list[tuple[Task, ...]]
    observed_stragglers: np.ndarray
    stragglers: np.ndarray           # effective: all False when the master waited for everyone
    waited_for_all: bool
    newly_decodable: list[int] = field(default_factory=list)
    deadline_job: int | None = None  # the job whose deadline is this round (decodable by now)


class _SequentialScheme:
    def __init__(self, n: int, B: int, W: int, lam: int, num_jobs: int | None = None,
                 fallback: str = "wait") -> None:
        if n < 1 or B < 1 or W < B + 1 or not 0 <= lam <= n:
            raise ConfigError("sequential_gc", f"need n >= 1, B >= 1, W >= B + 1, 0 <= lambda <= n; "
                              f"got n={n}, B={B}, W={W}, lambda={lam}")
        if fallback not in ("wait", "raise"):
            raise ConfigError("sequential_gc.fallback", f"unknown fallback {fallback!r}", "use 'wait' or 'raise'")
        self.n, self.B, self.W, self.lam = int(n), int(B), int(W), int(lam)
        self.num_jobs = num_jobs
        self.fallback = fallback
        self.round = 0
        self.history: list[np.ndarray] = []                 # effective stragglers per past round
        self.decodable_at: dict[int, int] = {}

    T: int
    load: float

    def job_exists(self, job: int) -> bool:
        """Whether ``job`` is one of the scheme's jobs (``0 <= job < num_jobs``)."""
        return job >= 0 and (self.num_jobs is None or job < self.num_jobs)

    @property
    def total_rounds(self) -> int | None:
        """Rounds needed to finish ``num_jobs`` jobs (``num_jobs + T``)."""
        return None if self.num_jobs is None else self.num_jobs + self.T

    def follows_model(self, is_straggler: np.ndarray) -> bool:
        """Whether this round's pattern keeps the effective history within ``(B, W, lambda)``."""
        window = np.array(self.history[-self.W:], dtype=bool).reshape(-1, self.n)
        return follows_bursty_model(window, is_straggler, self.B, self.W, self.lam)

    def tasks(self) -> list[tuple[Task, ...]]:
        """Tasks of every worker in the current round (depends only on past rounds)."""
        raise NotImplementedError

    def is_decodable(self, job: int) -> bool:
        raise NotImplementedError

    def _record(self, tasks: list[tuple[Task, ...]], returned: np.ndarray) -> None:
        raise NotImplementedError

    def step(self, is_straggler: Sequence[bool] | np.ndarray) -> RoundReport:
        """Run the current round with the given straggler pattern and advance."""
        observed = np.asarray(is_straggler, dtype=bool).reshape(self.n)
        tasks = self.tasks()
        waited = not self.follows_model(observed)
        if waited and self.fallback == "raise":
            raise AggregationError(
                f"round {self.round}: stragglers {np.flatnonzero(observed).tolist()} break the "
                f"(B={self.B}, W={self.W}, lambda={self.lam}) model",
                "use fallback='wait' to wait for every worker in such rounds, or a larger lambda")
        effective = np.zeros(self.n, dtype=bool) if waited else observed
        self._record(tasks, ~effective)
        self.history.append(effective)
        r = self.round
        newly = []
        for job in range(max(0, r - self.T), r + 1):
            if self.job_exists(job) and job not in self.decodable_at and self.is_decodable(job):
                self.decodable_at[job] = r
                newly.append(job)
        deadline = r - self.T
        if self.job_exists(deadline) and deadline not in self.decodable_at:
            raise AggregationError(f"job {deadline} is not decodable at its deadline (round {r})",
                                   "this should not happen when the pattern follows the model; report it")
        self.round += 1
        self._prune(r - self.T - self.W)
        return RoundReport(r, tasks, observed, effective, waited, newly,
                           deadline if self.job_exists(deadline) else None)

    def run(self, pattern: np.ndarray) -> list[RoundReport]:
        """Step through every row of a ``(rounds, n)`` straggler pattern."""
        return [self.step(row) for row in np.asarray(pattern, dtype=bool)]

    def _prune(self, oldest_kept_job: int) -> None:
        """Forget bookkeeping of jobs older than ``oldest_kept_job`` (long past their deadline)."""

    def _base_state(self) -> dict[str, Any]:
        return {"n": self.n, "B": self.B, "W": self.W, "lam": self.lam, "num_jobs": self.num_jobs,
                "fallback": self.fallback, "round": self.round,
                "history": [row.tolist() for row in self.history],
                "decodable_at": {str(k): v for k, v in self.decodable_at.items()}}

    def _load_base(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.history = [np.asarray(row, dtype=bool) for row in state["history"]]
        self.decodable_at = {int(k): int(v) for k, v in state["decodable_at"].items()}


class SelectiveRepeatSGC(_SequentialScheme):
    """SR-SGC: gradient coding for ``s = ceil(B lambda / (W - 1 + B))`` plus selective repetition.

    Parameters
    ----------
    n, B, W, lam
        Workers and the ``(B, W, lambda)`` straggler model; ``B`` must divide ``W - 1``.
    num_jobs
        Number of jobs (``None``: an endless stream).
    fallback
        ``"wait"`` or ``"raise"`` for rounds that break the model.
    """

    def __init__(self, n: int, B: int, W: int, lam: int, num_jobs: int | None = None,
                 fallback: str = "wait") -> None:
        super().__init__(n, B, W, lam, num_jobs, fallback)
        if (W - 1) % B != 0:
            raise ConfigError("sequential_gc.B", f"SR-SGC needs B | (W - 1), got B={B}, W={W}",
                              "choose W = x * B + 1, or use the multiplexed scheme")
        self.s = math.ceil(B * lam / (W - 1 + B))
        self.T = B
        self.load = (self.s + 1) / n
        self.delivered: dict[int, dict[int, int]] = {}      # job -> {worker: round}

    def tasks(self) -> list[tuple[Task, ...]]:
        r = self.round
        out: list[tuple[Task, ...]] = [((Task(r, "gc"),) if self.job_exists(r) else ()) for _ in range(self.n)]
        t = r - self.B
        if self.job_exists(t):
            got = self.delivered.get(t, {})
            missing = [i for i in range(self.n) if i not in got]
            if len(missing) > self.s:
                # Prefer workers that straggled in round t: under the model they cannot straggle now.
                # (The authors' simulator takes the first v - s by index; see the report.)
                stragglers_t = self.history[t]
                ordered = sorted(missing, key=lambda i: (not stragglers_t[i], i))
                for i in ordered[:len(missing) - self.s]:
                    out[i] = (Task(t, "gc", repeat=True),)
        return out

    def _record(self, tasks, returned) -> None:
        for i, worker_tasks in enumerate(tasks):
            if returned[i]:
                for task in worker_tasks:
                    self.delivered.setdefault(task.job, {})[i] = self.round

    def _prune(self, oldest_kept_job: int) -> None:
        for job in [j for j in self.delivered if j < oldest_kept_job]:
            del self.delivered[job]

    def received(self, job: int) -> list[int]:
        """Workers whose coded task of ``job`` arrived (decode with the ``s``-straggler code)."""
        return sorted(self.delivered.get(job, {}))

    def is_decodable(self, job: int) -> bool:
        return len(self.delivered.get(job, {})) >= self.n - self.s

    @staticmethod
    def normalized_load(n: int, B: int, W: int, lam: int) -> float:
        """``(s + 1) / n`` with ``s = ceil(B lambda / (W - 1 + B))``."""
        return (math.ceil(B * lam / (W - 1 + B)) + 1) / n

    def state_dict(self) -> dict[str, Any]:
        state = self._base_state()
        state["delivered"] = {str(j): {str(i): r for i, r in d.items()} for j, d in self.delivered.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base(state)
        self.delivered = {int(j): {int(i): int(r) for i, r in d.items()} for j, d in state["delivered"].items()}


class MultiplexedSGC(_SequentialScheme):
    """M-SGC: uncoded D1 chunks plus ``B`` GC-coded D2 groups, multiplexed over ``W - 1 + B`` slots.

    Data split of one job (fractions of the job's data, see :meth:`data_fractions`): ``n (W - 1)``
    D1 chunks (chunk ``c`` of worker ``i``) and ``B`` D2 groups, each cut into ``n`` partitions and coded
    with a gradient code for ``s = lambda`` stragglers (worker ``i`` computes its coded combination).
    With ``lambda = n`` the D2 part is empty.
    """

    def __init__(self, n: int, B: int, W: int, lam: int, num_jobs: int | None = None,
                 fallback: str = "wait") -> None:
        super().__init__(n, B, W, lam, num_jobs, fallback)
        self.d1_slots = W - 1
        self.slots = W - 1 + B
        self.T = W - 2 + B
        self.load = self.normalized_load(n, B, W, lam)
        self.d1: dict[int, np.ndarray] = {}                 # job -> (n, W-1) delivered chunks
        self.d2: dict[int, list[set[int]]] = {}             # job -> per group, workers delivered

    @staticmethod
    def normalized_load(n: int, B: int, W: int, lam: int) -> float:
        """``(lambda+1)(W-1+B) / (n (B + (W-1)(lambda+1)))``, or ``(W-1+B) / (n (W-1))`` if ``lambda = n``."""
        if lam == n:
            return (W - 1 + B) / (n * (W - 1))
        return (lam + 1) * (W - 1 + B) / (n * (B + (W - 1) * (lam + 1)))

    def data_fractions(self) -> dict[str, float]:
        """Fraction of a job's data in ONE D1 chunk and in ONE D2 group (``n(W-1) d1 + B d2 = 1``)."""
        if self.lam == self.n:
            return {"d1_chunk": 1.0 / (self.n * (self.W - 1)), "d2_group": 0.0}
        d2 = 1.0 / (self.B + (self.W - 1) * (self.lam + 1))
        return {"d1_chunk": (self.lam + 1) * d2 / self.n, "d2_group": d2}

    def _chunks(self, job: int) -> np.ndarray:
        if job not in self.d1:
            self.d1[job] = np.zeros((self.n, self.d1_slots), dtype=bool)
            self.d2[job] = [set() for _ in range(self.B)]
        return self.d1[job]

    def tasks(self) -> list[tuple[Task, ...]]:
        r = self.round
        out = []
        for i in range(self.n):
            mine = []
            for m in range(self.slots):
                job = r - m
                if not self.job_exists(job):
                    continue
                if m < self.d1_slots:
                    mine.append(Task(job, "d1", m))
                    continue
                have = self._chunks(job)[i]
                if have.all():
                    mine.append(Task(job, "d2", m - self.d1_slots))
                else:
                    mine.append(Task(job, "d1", int(np.flatnonzero(~have)[0]), repeat=True))
            out.append(tuple(mine))
        return out

    def _record(self, tasks, returned) -> None:
        for i, worker_tasks in enumerate(tasks):
            if not returned[i]:
                continue
            for task in worker_tasks:
                if task.kind == "d1":
                    self._chunks(task.job)[i, task.index] = True
                else:
                    self._chunks(task.job)
                    self.d2[task.job][task.index].add(i)

    def _prune(self, oldest_kept_job: int) -> None:
        for job in [j for j in self.d1 if j < oldest_kept_job]:
            del self.d1[job], self.d2[job]

    def received(self, job: int) -> dict[str, Any]:
        """``{"d1": (n, W-1) bool, "d2": [sorted workers per group]}`` for ``job``."""
        chunks = self._chunks(job)
        return {"d1": chunks.copy(), "d2": [sorted(g) for g in self.d2[job]]}

    def is_decodable(self, job: int) -> bool:
        if not self._chunks(job).all():
            return False
        need = self.n - self.lam
        return all(len(g) >= need for g in self.d2[job])

    def state_dict(self) -> dict[str, Any]:
        state = self._base_state()
        state["d1"] = {str(j): a.tolist() for j, a in self.d1.items()}
        state["d2"] = {str(j): [sorted(g) for g in groups] for j, groups in self.d2.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base(state)
        self.d1 = {int(j): np.asarray(a, dtype=bool).reshape(self.n, self.d1_slots) for j, a in state["d1"].items()}
        self.d2 = {int(j): [set(g) for g in groups] for j, groups in state["d2"].items()}
