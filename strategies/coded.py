"""Coded gradient descent: gradient coding (GC) and sequential GC against stragglers (``coded_gd``).

References
----------
* Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding Stragglers in Distributed
  Learning", ICML 2017 (arXiv 1612.03301). Spec ``server-algorithms.md`` section 4a.
* Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for Straggler Mitigation", ICLR 2023
  (arXiv 2211.13802). Spec section 4b.

The pure math is in :mod:`fedsim.strategies.gradient_coding` (codes, encode/decode),
:mod:`fedsim.strategies.sequential_gc` (SR-SGC and M-SGC schedulers) and
:mod:`fedsim.strategies.stragglers` (straggler models, compute-time model). This module runs it
as a Flower strategy plus a client task (``train.coded_gradient``).

Setting and the replication assumption
--------------------------------------
Distributed full-batch gradient descent on the union of the clients' training data: the
``n = data.num_clients`` workers are the clients and the data is cut into ``n`` partitions, the
clients' shards (``federation.client_indices``). Gradient coding REPLICATES data by design:
worker ``i`` computes the gradients of the shards ``j in code.partitions_of(i)`` (``s + 1`` of
them), not only its own. In this simulator every client process rebuilds the same federation from
the seed, so a worker reads any shard it is assigned; on a real deployment (``data-path`` node
data) the task refuses to run. The client reads ranges of the concatenated shard order
``concat(client_indices)``; the server owns the layout and sends, per task, the ranges and the
code coefficients ``B_ij``, and the client returns ``sum_j B_ij g_j`` computed with
:func:`~fedsim.strategies.gradient_coding.encode` (``g_j`` = gradient of the SUMMED cross-entropy
of piece ``j``). The server decodes ``sum_j g_j`` and steps ``x <- x - lr * (sum_j g_j) / N``
(``N`` = all training samples), i.e. exact full-batch GD on the mean loss.

Stragglers and the simulated clock
----------------------------------
Stragglers are drawn server-side, seeded, for the whole run (``stragglers`` = ``none`` |
``bernoulli`` (``p``) | ``gilbert_elliott`` (``p_good_to_bad``, ``p_bad_to_good``) | ``bursty``
(the ``(B, W, lam)`` model with ``p_start``, ``p_continue``)); every worker still computes, and its
simulated time is ``overhead + base_time * load * jitter_noise + straggler_delay * straggling``
(:class:`~fedsim.strategies.stragglers.ComputeTimeModel`, ``load`` = the fraction of the data it
computed this round). Pattern and jitter depend only on the seed and the straggler options, so
uncoded, GC and sequential GC runs of one seed see the same stragglers (common random numbers).
``[faults] stragglers`` is not used here (``ConfigError`` if set).

* GC (``sequential = "none"``): the master decodes from the FIRST ``n - s`` valid coded results
  (in simulated-time order); the round lasts until the ``(n - s)``-th arrived. ``s = 0`` is
  uncoded GD (each worker computes its own shard, the master waits for all).
  More than ``s`` stragglers (``on_excess``): ``"wait"`` (default) waits for the fastest
  stragglers needed, so the step is still exact and the round is slow; ``"skip"`` does not wait,
  leaves the model unchanged and records a typed ``AggregationError`` for the round (status
  ``aggregation`` in clients.jsonl, ``aggregation-failed = 1`` in metrics.jsonl). Missing replies
  (crash, dropout, invalid) are worse than stragglers: the decoder checks its residual and raises
  ``AggregationError`` when the survivors cannot produce the full gradient. A silently wrong
  gradient is never applied.
* Sequential GC (``sequential = "sr-sgc" | "m-sgc"``, parameters ``B``, ``W``, ``lam``): job ``t`` =
  the full gradient at the model of round ``t``; the scheduler gives every worker its mini-tasks
  (for up to ``T + 1`` jobs, each at its own model version, all sent with the message). As in the
  authors' simulator, a worker is a straggler when its simulated time exceeds
  ``(1 + mu) * fastest``; if that pattern breaks the ``(B, W, lam)`` model the master waits for
  everyone. Every job is decoded exactly by its deadline (round ``t + T``); option ``jobs`` says
  what a job trains:

  - ``"interleaved"`` (default; the paper's use, concurrent training of several models): ``T + 1``
    replicas of the model, all from the same initialisation, trained round-robin; job ``t`` is the
    gradient of replica ``t mod (T + 1)``, applied to it when decoded, before that replica's next
    job starts. Each replica therefore follows EXACT full-batch GD, one step every ``T + 1``
    rounds; the global model reported each round is the replica updated last (``model-steps`` =
    its number of GD steps).
  - ``"delayed"``: one model; job ``t`` is the gradient at the round-``t`` model, applied in the
    round it becomes decodable: pipelined GD with delayed gradients (delay ``<= T``; SR-SGC: 0 in
    rounds with at most ``s`` stragglers, M-SGC: always ``T = W - 2 + B``), which needs a smaller
    ``lr`` to stay stable.

  ``num_jobs = rounds - T``: the last ``T`` rounds only finish pending jobs.
  M-SGC data split: ``n (W - 1)`` uncoded D1 chunks then ``B`` D2 groups of ``n`` partitions each
  (fractions from :meth:`MultiplexedSGC.data_fractions`), cut in the concatenated shard order.

Metrics per round: ``sim-round-time``, ``sim-total-time``, ``worker-load-mean`` (samples computed
/ N, averaged over all workers), ``worker-load-max``, ``nominal-load``, ``stragglers`` (drawn),
``waited-stragglers`` (GC), ``detected-stragglers`` / ``waited-for-all`` / ``jobs-decoded`` /
``decode-delay`` (sequential), ``decoded``, ``model-steps``. clients.jsonl: used workers ``ok`` (``used = 1``),
faster-than-needed-but-unused workers ``ok`` with ``used = 0``, stragglers not waited for
``straggler``.

``precision = "float64"`` keeps the server's copy of the parameters in float64, sends it to the
workers, and computes gradients on a float64 copy of the model (exactness checks); the
returned global model keeps the model's dtype. Models with BatchNorm or dropout are rejected
(their gradients are not sums of per-partition gradients).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsim.clients.client_app import CLIENT_TASKS, ClientCall
from fedsim.config import Scenario
from fedsim.errors import AggregationError, ClientUpdateError, ConfigError, DataError
from fedsim.rng import numpy_rng
from fedsim.strategies.base import (
    MAX_NUM_EXAMPLES,
    ClientUpdate,
    FailureRecord,
    FedSimStrategy,
    register_strategy,
)
from fedsim.strategies.gradient_coding import GradientCode, encode, make_code
from fedsim.strategies.sequential_gc import MultiplexedSGC, SelectiveRepeatSGC
from fedsim.strategies.signsgd import ParamLayout, check_gradient_model, flat_gradient
from fedsim.strategies.stragglers import (
    ComputeTimeModel,
    bernoulli_stragglers,
    bursty_stragglers,
    gilbert_elliott_stragglers,
)
from fedsim.wire import from_numpy, to_numpy

__all__ = ["CodedGD", "coded_gradient_task"]

CODED_RECORD = "coded"


def _federation(scenario: Scenario):
    from fedsim.data.federation import make_federation

    d = scenario.data
    return make_federation(dataset=d.dataset, num_clients=d.num_clients, partitioner=d.partitioner,
                           partition=d.partition, options=d.options, test_fraction=d.test_fraction,
                           server_labelled=d.server_labelled, seed=scenario.run.seed)


def _split(total: int, fractions: list[float]) -> list[int]:
    """Integer sizes summing to ``total``, proportional to ``fractions`` (largest remainder)."""
    raw = np.asarray(fractions, dtype=np.float64) * total / max(sum(fractions), 1e-300)
    sizes = np.floor(raw).astype(int)
    short = total - int(sizes.sum())
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[:short]] += 1
    return sizes.tolist()


# ---------------------------------------------------------------------------------------------
# client task
def _piece_gradient(call: ClientCall, model: torch.nn.Module, start: int, stop: int, dtype: torch.dtype,
                    dim: int) -> np.ndarray:
    """Gradient of the summed cross-entropy over rows ``start:stop`` of the concatenated shards."""
    rt = call.runtime
    if stop <= start:
        return np.zeros(dim)

    def make():
        order = rt.cache("coded-order", lambda: np.concatenate(rt.federation.client_indices))
        idx = order[start:stop]
        ds = rt.federation.dataset
        return (torch.tensor(np.asarray(ds.x_train[idx]), dtype=dtype, device=rt.device),
                torch.tensor(np.asarray(ds.y_train[idx]), dtype=torch.long, device=rt.device))

    x, y = rt.cache(f"coded-piece-{start}-{stop}-{dtype}", make)
    g, _ = flat_gradient(model, x, y, reduction="sum")
    return g.to(torch.float64).cpu().numpy()


@CLIENT_TASKS.register("coded_gradient")
def coded_gradient_task(call: ClientCall) -> RecordDict:
    """Compute every assigned mini-task: ``sum_j B_ij g_j`` over the listed pieces, at the model
    version of the task's job; one array per task under the ArrayRecord ``coded``."""
    if call.data_path:
        raise DataError("coded_gd replicates data across workers and needs the simulated federation",
                        "run coded_gd on the local or ray engine (no per-node data files)")
    cfg = call.config
    tasks = json.loads(str(cfg["tasks"]))
    current = int(cfg["job"])
    f64 = str(cfg.get("precision", "float32")) == "float64"
    rt = call.runtime
    if f64:
        model = rt.cache("coded-model-float64", lambda: copy.deepcopy(rt.model).double())
        dtype, out_dtype = torch.float64, np.float64
    else:
        model, dtype, out_dtype = rt.model, torch.float32, np.float32
    model.train()
    dim = ParamLayout.from_model(model).dim
    records = call.msg.content.array_records
    out, samples, loaded = {}, 0, None
    for k, (job, terms) in enumerate(tasks):
        if job != loaded:
            rec = records["arrays"] if job == current else records[f"model.{job}"]
            model.load_state_dict(rt.decoded(rec), strict=True)
            loaded = job
        row = np.zeros(max(int(t[0]) for t in terms) + 1)
        grads = {}
        for piece, start, stop, coef in terms:
            row[int(piece)] = float(coef)
            grads[int(piece)] = _piece_gradient(call, model, int(start), int(stop), dtype, dim)
            samples += int(stop) - int(start)
        out[str(k)] = from_numpy(encode(row[None, :], 0, grads).astype(out_dtype))
    total = int(sum(len(i) for i in rt.federation.client_indices))
    metrics = call.reply_metrics(**{"num-examples": samples, "tasks": len(tasks), "load": samples / total})
    return RecordDict({CODED_RECORD: ArrayRecord(out), "metrics": metrics})


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Work:
    """One mini-task for one worker: ``sum_{(piece, coef) in terms} coef * g_piece`` at model ``job``."""

    job: int
    kind: str            # "gc" | "d1" | "d2"
    index: int
    terms: tuple[tuple[int, float], ...]


SCHEMES = {"fr": "fractional", "fractional": "fractional", "cyclic": "cyclic"}


@register_strategy
class CodedGD(FedSimStrategy):
    """Full-batch GD with gradient coding / sequential gradient coding; see the module docstring."""

    name = "coded_gd"
    train_action = "train.coded_gradient"
    tiny_overrides = ("strategy.s=1", "strategy.p=0.3")

    @dataclass(frozen=True)
    class Options:
        scheme: str = "cyclic"          # cyclic | fr (fractional repetition, needs (s+1) | n)
        s: int = 1                      # stragglers tolerated by GC (0 = uncoded GD)
        lr: float = 0.5                 # GD step on the mean loss
        stragglers: str = "bernoulli"   # none | bernoulli | gilbert_elliott | bursty
        p: float = 0.1                  # bernoulli: straggle probability per worker and round
        p_good_to_bad: float = 0.05     # gilbert_elliott
        p_bad_to_good: float = 0.5
        p_start: float = 0.05           # bursty (B, W, lam) generator
        p_continue: float = 0.7
        sequential: str = "none"        # none | sr-sgc | m-sgc
        B: int = 1                      # burst length of the (B, W, lam) model
        W: int = 3                      # window
        lam: int = 1                    # distinct stragglers per window
        mu: float = 0.1                 # sequential GC: straggler if time > (1 + mu) * fastest
        on_excess: str = "wait"         # GC with > s stragglers: wait | skip
        base_time: float = 1.0          # simulated seconds to compute the WHOLE data set's gradient
        jitter: float = 0.05            # log-normal sigma of per-worker time noise
        straggler_delay: float = 1.0    # extra simulated seconds of a straggler
        overhead: float = 0.0           # fixed simulated seconds per round
        jobs: str = "interleaved"       # sequential GC: interleaved (T + 1 model replicas) | delayed
        precision: str = "float32"      # float32 | float64 (server master copy + float64 gradients)

        def __post_init__(self) -> None:
            checks = [
                (self.scheme in SCHEMES, f"scheme must be 'cyclic' or 'fr', got {self.scheme!r}"),
                (self.s >= 0, f"s must be >= 0, got {self.s}"),
                (self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}"),
                (self.stragglers in ("none", "bernoulli", "gilbert_elliott", "bursty"),
                 f"stragglers must be none, bernoulli, gilbert_elliott or bursty, got {self.stragglers!r}"),
                (self.sequential in ("none", "sr-sgc", "m-sgc"),
                 f"sequential must be none, sr-sgc or m-sgc, got {self.sequential!r}"),
                (self.on_excess in ("wait", "skip"), f"on_excess must be 'wait' or 'skip', got {self.on_excess!r}"),
                (self.jobs in ("interleaved", "delayed"),
                 f"jobs must be 'interleaved' or 'delayed', got {self.jobs!r}"),
                (self.precision in ("float32", "float64"),
                 f"precision must be 'float32' or 'float64', got {self.precision!r}"),
                (self.B >= 1 and self.W >= self.B + 1 and self.lam >= 0,
                 f"need B >= 1, W >= B + 1, lam >= 0; got B={self.B}, W={self.W}, lam={self.lam}"),
                (self.mu >= 0, f"mu must be >= 0, got {self.mu}"),
                (self.base_time > 0 and self.jitter >= 0 and self.straggler_delay >= 0 and self.overhead >= 0,
                 "base_time must be > 0 and jitter, straggler_delay, overhead >= 0"),
            ]
            for name in ("p", "p_good_to_bad", "p_bad_to_good", "p_start", "p_continue"):
                v = getattr(self, name)
                checks.append((0.0 <= v <= 1.0, f"{name} must be a probability in [0, 1], got {v}"))
            for ok, msg in checks:
                if not ok:
                    raise ValueError(msg)

    # ------------------------------------------------------------------ set-up
    def __init__(self, scenario: Scenario, options: Any | None = None) -> None:
        super().__init__(scenario, options)
        o = self.options
        n = self.num_partitions
        check_gradient_model(scenario, self.name)
        if self.fraction_train < 1.0:
            raise ConfigError("strategy.fraction_train", "coded_gd needs every worker in every round",
                              "set strategy.fraction_train = 1.0")
        if scenario.faults.stragglers > 0:
            raise ConfigError("faults.stragglers", "coded_gd draws its own stragglers",
                              "set strategy.stragglers / strategy.p (and friends) instead, and faults.stragglers = 0")
        self.layout = ParamLayout.from_scenario(scenario)
        fed = _federation(scenario)
        sizes = [len(i) for i in fed.client_indices]
        self.N = int(sum(sizes))
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.shard_pieces = [(int(offsets[j]), int(offsets[j + 1])) for j in range(n)]
        self.rounds = scenario.run.rounds
        scheme = SCHEMES[o.scheme]
        self.sched: SelectiveRepeatSGC | MultiplexedSGC | None = None
        self.code: GradientCode
        if o.sequential == "none":
            self.code = self._make_code(n, o.s, scheme, "s")
            self.T = 0
            self.nominal_load = self.code.load
        else:
            if o.on_excess != "wait":
                raise ConfigError("strategy.on_excess", "sequential GC follows its scheme's rule (wait for "
                                  "every worker when the pattern breaks the model)", "use on_excess = \"wait\"")
            if o.lam >= n:
                raise ConfigError("strategy.lam", f"lam must be < n = {n} workers, got {o.lam}")
            cls = SelectiveRepeatSGC if o.sequential == "sr-sgc" else MultiplexedSGC
            if cls is SelectiveRepeatSGC and (o.W - 1) % o.B:
                raise ConfigError("strategy.B", f"SR-SGC needs B | (W - 1), got B = {o.B}, W = {o.W}",
                                  "choose W = x * B + 1, or sequential = \"m-sgc\"")
            T = o.B if cls is SelectiveRepeatSGC else o.W - 2 + o.B
            if self.rounds <= T:
                raise ConfigError("run.rounds", f"{o.sequential} has delay T = {T}; the run needs more than {T} rounds",
                                  f"set run.rounds >= {T + 1} (the last T rounds only finish pending jobs)")
            self.sched = cls(n, o.B, o.W, o.lam, num_jobs=self.rounds - T, fallback="wait")
            self.T = self.sched.T
            self.nominal_load = float(self.sched.load)
            if cls is SelectiveRepeatSGC:
                self.code = self._make_code(n, self.sched.s, scheme, "lam")
            else:
                self.code = self._make_code(n, o.lam, scheme, "lam")
                fr = self.sched.data_fractions()
                pieces = _split(self.N, [fr["d1_chunk"]] * (n * (o.W - 1)) + [fr["d2_group"] / n] * (o.B * n))
                bounds = np.concatenate([[0], np.cumsum(pieces)]).astype(int)
                self.msgc_pieces = [(int(bounds[k]), int(bounds[k + 1])) for k in range(len(pieces))]
        self.time_model = ComputeTimeModel(o.base_time, o.jitter, o.straggler_delay, o.overhead)
        self.pattern = self._draw_pattern()
        self.noise = self.time_model.noise(numpy_rng(self.seed, "coded-time"), self.rounds, n)
        # mutable state (state_dict)
        self.sim_total = 0.0
        self.interleaved = self.sched is not None and o.jobs == "interleaved"
        self.replicas: list[list[np.ndarray]] = []     # model(s) in server precision
        self.steps: list[int] = []                     # GD steps applied to each replica
        self.shown = 0                                 # the replica returned as the global model
        self.versions: dict[int, list[np.ndarray]] = {}
        self.results: dict[tuple[int, str, int, int], np.ndarray] = {}
        self.work: dict[int, list[_Work]] = {}

    def _make_code(self, n: int, s: int, scheme: str, option: str) -> GradientCode:
        if not 0 <= s < n:
            raise ConfigError(f"strategy.{option}", f"the code needs 0 <= s < n = {n} workers, got s = {s}")
        if scheme == "fractional" and n % (s + 1):
            raise ConfigError("strategy.scheme", f"fractional repetition needs (s + 1) | n, got s = {s}, n = {n}",
                              "use scheme = \"cyclic\", or an s with s + 1 dividing data.num_clients")
        return make_code(n, s, scheme, numpy_rng(self.seed, "gradient-code"))

    def _draw_pattern(self) -> np.ndarray:
        o, n, R = self.options, self.num_partitions, self.rounds
        rng = numpy_rng(self.seed, "coded-stragglers", o.stragglers)
        if o.stragglers == "bernoulli":
            return bernoulli_stragglers(rng, n, R, o.p)
        if o.stragglers == "gilbert_elliott":
            return gilbert_elliott_stragglers(rng, n, R, o.p_good_to_bad, o.p_bad_to_good)
        if o.stragglers == "bursty":
            return bursty_stragglers(rng, n, R, o.B, o.W, o.lam, o.p_start, o.p_continue)
        return np.zeros((R, n), dtype=bool)

    # ------------------------------------------------------------------ tasks of a round
    def _terms(self, code: GradientCode, worker: int, pieces: list[int]) -> tuple[tuple[int, float], ...]:
        return tuple((pieces[j], float(code.B[worker, j])) for j in code.partitions_of(worker))

    def _round_work(self, r: int) -> dict[int, list[_Work]]:
        n, o = self.num_partitions, self.options
        shards = list(range(n))
        if self.sched is None:
            return {i: [_Work(r, "gc", 0, self._terms(self.code, i, shards))] for i in range(n)}
        if self.sched.round != r:
            raise AggregationError(f"sequential GC scheduler is at round {self.sched.round}, the run at {r}",
                                   "the strategy state is out of step; restart the run")
        out: dict[int, list[_Work]] = {}
        for i, tasks in enumerate(self.sched.tasks()):
            work = []
            for t in tasks:
                if t.kind == "gc":
                    work.append(_Work(t.job, "gc", 0, self._terms(self.code, i, shards)))
                elif t.kind == "d1":
                    work.append(_Work(t.job, "d1", t.index, ((i * (o.W - 1) + t.index, 1.0),)))
                else:
                    base = n * (o.W - 1) + t.index * n
                    work.append(_Work(t.job, "d2", t.index, self._terms(self.code, i, [base + j for j in shards])))
            out[i] = work
        return out

    def _piece_range(self, piece: int) -> tuple[int, int]:
        if self.sched is not None and isinstance(self.sched, MultiplexedSGC):
            return self.msgc_pieces[piece]
        return self.shard_pieces[piece]

    def _samples(self, work: list[_Work]) -> int:
        return sum(b - a for w in work for p, _ in w.terms for a, b in [self._piece_range(p)])

    # ------------------------------------------------------------------ Flower interface
    def _replica_of(self, job: int) -> int:
        return job % len(self.replicas) if self.interleaved else 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        self.set_global(arrays)
        if not self.replicas:
            f64 = self.options.precision == "float64"
            start = [np.array(a, dtype=np.float64 if f64 and a.dtype.kind == "f" else a.dtype, copy=True)
                     for a in self.current]
            self.replicas = [[a.copy() for a in start] for _ in range(self.T + 1 if self.interleaved else 1)]
            self.steps = [0] * len(self.replicas)
        r = server_round - 1
        self.work = self._round_work(r)
        model = self.replicas[self._replica_of(r)]       # job r's model
        if self.sched is not None and self.sched._job_exists(r):
            self.versions[r] = [a.copy() for a in model]
        plain = self.options.precision == "float32" and not self.interleaved
        self._round_record = arrays if plain else self.to_record(model)
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        keep, old = [], {}
        for m in msgs:
            pid = self.directory[m.metadata.dst_node_id]
            if not self.work.get(pid):
                continue                     # nothing to compute this round (sequential drain)
            for job in sorted({w.job for w in self.work[pid]} - {r}):
                if job not in old:
                    old[job] = self.to_record(self.versions[job])
                m.content[f"model.{job}"] = old[job]
            keep.append(m)
        self.sampled = [self.directory[m.metadata.dst_node_id] for m in keep]
        self._sent = keep
        return keep

    def train_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        tasks = [[w.job, [[p, *self._piece_range(p), c] for p, c in w.terms]] for w in self.work.get(partition_id, [])]
        return {"tasks": json.dumps(tasks), "job": server_round - 1, "precision": self.options.precision}

    def train_arrays(self, server_round: int, partition_id: int, arrays: ArrayRecord) -> ArrayRecord:
        return self._round_record

    def parse_reply(self, content: RecordDict, metrics: dict[str, Any], pid: int) -> list[np.ndarray]:
        work = self.work.get(pid)
        if work is None:
            raise ClientUpdateError(pid, "partition-id", "not a worker of this round")
        if CODED_RECORD not in content.array_records:
            raise ClientUpdateError(pid, CODED_RECORD, "missing from the reply",
                                    "the client task must return an ArrayRecord 'coded'")
        rec = content.array_records[CODED_RECORD]
        want = [str(k) for k in range(len(work))]
        if list(rec.keys()) != want:
            raise ClientUpdateError(pid, CODED_RECORD,
                                    f"keys {list(rec.keys())[:5]} != {want[:5]} (one array per task)")
        dtype = np.float64 if self.options.precision == "float64" else np.float32
        out = []
        for k in want:
            field = f"{CODED_RECORD}.{k}"
            try:
                a = to_numpy(rec[k])
            except ValueError as err:
                raise ClientUpdateError(pid, field, str(err), "the record is corrupt") from None
            if a.dtype != dtype:
                raise ClientUpdateError(pid, field, f"dtype {a.dtype}, expected {np.dtype(dtype)}")
            if a.shape != (self.layout.dim,):
                raise ClientUpdateError(pid, field, f"shape {a.shape}, expected ({self.layout.dim},)",
                                        "client and server must build the same model")
            if not np.isfinite(a).all():
                raise ClientUpdateError(pid, field, "contains NaN or Inf")
            out.append(np.asarray(a, dtype=np.float64))
        return out

    def validate_weight(self, metrics: dict[str, Any], pid: int) -> int:
        n = metrics.get("num-examples")
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_NUM_EXAMPLES:
            raise ClientUpdateError(pid, "metrics.num-examples", f"must be an integer in 0..{MAX_NUM_EXAMPLES}, "
                                    f"got {n!r}")
        return n

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = self.collect(server_round, list(replies))
        r = server_round - 1
        n = self.num_partitions
        by_pid = {u.partition_id: u for u in updates if u.partition_id in self.work}
        active = sorted(p for p, w in self.work.items() if w)
        loads = {p: self._samples(self.work[p]) / self.N for p in active}
        tm = self.time_model
        times = {p: tm.overhead + tm.base_time * loads[p] * self.noise[r, p]
                 + tm.straggler_delay * float(self.pattern[r, p]) for p in active}
        m: dict[str, float | int] = {
            "worker-load-mean": float(sum(loads.values()) / n), "worker-load-max": max(loads.values(), default=0.0),
            "nominal-load": float(self.nominal_load), "stragglers": int(self.pattern[r].sum())}
        if self.sched is None:
            grads, round_time, used = self._gc_round(server_round, by_pid, times, m)
        else:
            grads, round_time, used = self._sequential_round(server_round, by_pid, times, active, m)
        self.sim_total += round_time
        m["sim-round-time"] = float(round_time)
        m["sim-total-time"] = float(self.sim_total)
        m["num-clients"] = len(used)
        m["num-examples"] = int(sum(by_pid[p].num_examples for p in used))
        self.last_updates = [by_pid[p] for p in sorted(by_pid) if "used" in by_pid[p].metrics]
        m["grad-norm"] = 0.0
        if not grads:
            m["model-steps"] = self.steps[self.shown]
            return None, MetricRecord(m)
        for job, g in grads:                 # job order; GD step of the job's replica
            k = self._replica_of(job)
            mean_grad = g / self.N
            x = self.layout.gather(self.keys, self.replicas[k]) - self.options.lr * mean_grad
            self.replicas[k] = self.layout.scatter(self.keys, self.replicas[k], x)
            self.steps[k] += 1
            m["grad-norm"] = float(np.linalg.norm(mean_grad))
        k = self.shown = self._replica_of(grads[-1][0])   # the global model: the replica updated last
        m["model-steps"] = self.steps[k]
        self.current = [a.astype(c.dtype) for a, c in zip(self.replicas[k], self.current)]
        return self.to_record(self.current), MetricRecord(m)

    @staticmethod
    def _mark(u: ClientUpdate, used: bool, straggler: bool, time: float) -> None:
        u.metrics.update({"used": int(used), "straggler": int(straggler), "sim-time": float(time)})

    def _straggler(self, server_round: int, u: ClientUpdate, time: float, why: str) -> None:
        self.failures.append(FailureRecord(server_round, u.partition_id, u.node_id, "straggler",
                                           f"straggler (simulated {time:.3f} s): {why}"))

    def _gc_round(self, server_round: int, by_pid: dict[int, ClientUpdate], times: dict[int, float],
                  m: dict[str, float | int]) -> tuple[list[tuple[int, np.ndarray]], float, list[int]]:
        r, n, s = server_round - 1, self.num_partitions, self.code.s
        k = n - s
        strag = self.pattern[r]
        arrivals = sorted(by_pid, key=lambda p: (times[p], p))
        if self.options.on_excess == "skip":
            arrivals = [p for p in arrivals if not strag[p]]
        used = arrivals[:k]
        grads: list[tuple[int, np.ndarray]] = []
        error: AggregationError | None = None
        if len(used) < k:
            round_time = max(times.values(), default=0.0) if self.options.on_excess == "wait" else \
                max((times[p] for p in arrivals), default=0.0)
            if self.options.on_excess == "skip":
                missing = n - len(by_pid)
                error = AggregationError(
                    f"round {server_round}: only {len(used)} of the {k} coded results needed arrived without "
                    f"waiting ({int(strag.sum())} stragglers > s = {s}, {missing} missing replies); "
                    "step skipped, model unchanged (on_excess = 'skip')",
                    "raise strategy.s, or use on_excess = \"wait\" to wait for the fastest stragglers")
        else:
            round_time = times[used[-1]] if used else 0.0
        if error is None:
            try:
                grads = [(r, self.code.decode(used, [by_pid[p].arrays[0] for p in used]))]
            except AggregationError as err:
                error = err
        if error is not None:
            grads, used = [], []
            self.failures.append(FailureRecord(server_round, None, 0, "aggregation", str(error)))
            m["aggregation-failed"] = 1
        m["decoded"] = int(bool(grads))
        m["waited-stragglers"] = int(sum(1 for p in used if strag[p]))
        for p, u in by_pid.items():
            if p in used:
                self._mark(u, True, bool(strag[p]), times[p])
            elif strag[p]:
                self._straggler(server_round, u, times[p], f"not waited for (round {server_round} closed at "
                                f"{round_time:.3f} s)" if not error else "round skipped")
            else:
                self._mark(u, False, False, times[p])
        return grads, round_time, used

    def _sequential_round(self, server_round: int, by_pid: dict[int, ClientUpdate], times: dict[int, float],
                          active: list[int], m: dict[str, float | int]
                          ) -> tuple[list[tuple[int, np.ndarray]], float, list[int]]:
        assert self.sched is not None
        r, n, mu = server_round - 1, self.num_partitions, self.options.mu
        tmin = min((times[p] for p in active), default=0.0)
        tmax = max((times[p] for p in active), default=0.0)
        observed = np.zeros(n, dtype=bool)
        for p in active:
            observed[p] = times[p] > (1.0 + mu) * tmin or p not in by_pid
        report = self.sched.step(observed)
        effective = report.stragglers
        round_time = tmax if report.waited_for_all else min((1.0 + mu) * tmin, tmax)
        used = []
        for p, u in by_pid.items():
            if effective[p]:
                self._straggler(server_round, u, times[p], f"later than (1 + mu) x fastest = {(1 + mu) * tmin:.3f} s; "
                                "not waited for")
                continue
            used.append(p)
            self._mark(u, True, bool(observed[p]), times[p])
            for w, y in zip(self.work[p], u.arrays):
                self.results[(w.job, w.kind, w.index, p)] = y
        grads, delay = [], []
        for job in sorted(report.newly_decodable):
            try:
                grads.append((job, self._decode_job(job)))
                delay.append(r - job)
            except AggregationError as err:
                self.failures.append(FailureRecord(server_round, None, 0, "aggregation", str(err)))
                m["aggregation-failed"] = 1
        m.update({"detected-stragglers": int(observed.sum()), "waited-for-all": int(report.waited_for_all),
                  "jobs-decoded": len(grads), "decode-delay": max(delay, default=0),
                  "decoded": int(bool(grads))})
        done = set(report.newly_decodable)
        oldest = r + 1 - self.T                # jobs older than this are never referenced again
        self.results = {k: v for k, v in self.results.items() if k[0] not in done and k[0] >= oldest}
        self.versions = {j: v for j, v in self.versions.items() if j >= oldest and j not in done}
        return grads, round_time, sorted(used)

    def _decode_job(self, job: int) -> np.ndarray:
        def result(kind: str, index: int, worker: int) -> np.ndarray:
            key = (job, kind, index, worker)
            if key not in self.results:
                raise AggregationError(f"job {job}: the {kind} result {index} of worker {worker} is missing "
                                       "(the worker failed, it did not straggle); the job is dropped",
                                       "sequential GC tolerates stragglers, not crashed workers")
            return self.results[key]

        if isinstance(self.sched, SelectiveRepeatSGC):
            workers = self.sched.received(job)
            return self.code.decode(workers, [result("gc", 0, w) for w in workers])
        assert isinstance(self.sched, MultiplexedSGC)
        got = self.sched.received(job)
        total = np.zeros(self.layout.dim)
        for i in range(self.num_partitions):
            for c in range(self.options.W - 1):
                total += result("d1", c, i)
        for g, workers in enumerate(got["d2"]):
            total += self.code.decode(workers, [result("d2", g, w) for w in workers])
        return total

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {"sim_total": np.asarray(self.sim_total), "steps": np.asarray(self.steps),
                                        "shown": np.asarray(self.shown)}
        for k, replica in enumerate(self.replicas):
            state.update({f"replica.{k}.{i}": a for i, a in enumerate(replica)})
        if self.sched is not None:
            state["scheduler"] = np.frombuffer(json.dumps(self.sched.state_dict()).encode(), dtype=np.uint8)
            for job, arrays in self.versions.items():
                state.update({f"version.{job}.{i}": a for i, a in enumerate(arrays)})
            for (job, kind, index, worker), y in self.results.items():
                state[f"result.{job}.{kind}.{index}.{worker}"] = y
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.sim_total = float(state.get("sim_total", 0.0))
        self.steps = [int(v) for v in np.asarray(state.get("steps", []), dtype=int).reshape(-1)]
        self.shown = int(state.get("shown", 0))
        replicas: dict[int, dict[int, np.ndarray]] = {}
        for key, a in state.items():
            parts = key.split(".")
            if parts[0] == "replica":
                replicas.setdefault(int(parts[1]), {})[int(parts[2])] = np.asarray(a)
        self.replicas = [[d[i] for i in sorted(d)] for _, d in sorted(replicas.items())]
        if self.sched is not None and "scheduler" in state:
            self.sched.load_state_dict(json.loads(bytes(np.asarray(state["scheduler"], dtype=np.uint8)).decode()))
            versions: dict[int, dict[int, np.ndarray]] = {}
            self.results = {}
            for key, a in state.items():
                parts = key.split(".")
                if parts[0] == "version":
                    versions.setdefault(int(parts[1]), {})[int(parts[2])] = np.asarray(a)
                elif parts[0] == "result":
                    self.results[(int(parts[1]), parts[2], int(parts[3]), int(parts[4]))] = np.asarray(a)
            self.versions = {j: [d[i] for i in sorted(d)] for j, d in versions.items()}
