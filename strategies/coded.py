"""Coded gradient descent against stragglers (``coded_gd``): gradient coding (GC) and sequential GC.

* Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding Stragglers in Distributed
  Learning", ICML 2017 (arXiv 1612.03301); spec ``server-algorithms.md`` section 4a.
* Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for Straggler Mitigation", ICLR 2023
  (arXiv 2211.13802); spec section 4b.

Exact full-batch GD on the union of the clients' data: every worker computes coded combinations
of piece gradients (client task ``train.coded_gradient``), the server decodes the full gradient
from the first results in simulated time and steps ``x <- x - lr * (sum_j g_j) / N``. Stragglers
and the clock are simulated server-side, seeded. This module is the Flower wiring (the template's
hooks), the client task, the options and the state. The work layout, the end of a round on the
simulated clock and decoding are in :mod:`fedsim.strategies.coded_work`; the math in
:mod:`~fedsim.strategies.coded_math`, :mod:`~fedsim.strategies.sequential_coded_math` and
:mod:`~fedsim.strategies.stragglers_math`. Design notes (replication, the clock, ``on_excess``, ``jobs``,
metrics): ``strategies/README.md``, section "coded_gd".
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid

from fedsim.clients.tasks import CLIENT_TASKS, ClientCall
from fedsim.config import Scenario
from fedsim.data.federation import federation_of
from fedsim.errors import ClientUpdateError, ConfigError, DataError
from fedsim.rng import numpy_rng
from fedsim.strategies.base import ClientUpdate, FedSimStrategy, register_strategy
from fedsim.strategies.coded_work import Work, end_gc_round, end_sequential_round, make_work_layout
from fedsim.strategies.coded_math import encode, message_dtype
from fedsim.strategies.gradients import ParamLayout, check_gradient_model, flat_gradient
from fedsim.strategies.replies import expect_array
from fedsim.strategies.stragglers_math import ComputeTimeModel, draw_stragglers
from fedsim.wire import from_numpy

__all__ = ["CodedGD", "coded_gradient_task"]

CODED_RECORD = "coded"


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
        dtype = torch.float64
    else:
        model, dtype = rt.model, torch.float32
    # the server picks the message dtype (coded_math.message_dtype): float64 unless uncoded
    out_dtype = np.float64 if str(cfg.get("transport", "float64" if f64 else "float32")) == "float64" else np.float32
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
SCHEMES = {"fr": "fractional", "fractional": "fractional", "cyclic": "cyclic"}


@dataclass(frozen=True)
class CodedOptions:
    """Options of ``coded_gd`` (``strategies/README.md``, "coded_gd")."""

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
    # coded messages travel in float64 unless s = 0 (uncoded): see coded_math.message_dtype

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
            (self.jobs in ("interleaved", "delayed"), f"jobs must be 'interleaved' or 'delayed', got {self.jobs!r}"),
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


@register_strategy
class CodedGD(FedSimStrategy):
    """Full-batch GD with gradient coding / sequential gradient coding; see the module docstring."""

    name = "coded_gd"
    train_action = "train.coded_gradient"
    tiny_overrides = ("strategy.s=1", "strategy.p=0.3")
    Options = CodedOptions
    min_num_examples = 0   # a worker may have nothing to compute for a job (an empty piece)
    aggregation_may_skip = True  # an undecodable round is the method's skip (decoded = 0), not a failed round

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
        if o.sequential != "none" and o.on_excess != "wait":
            raise ConfigError("strategy.on_excess", "sequential GC follows its scheme's rule (wait for every "
                              "worker when the pattern breaks the model)", "use on_excess = \"wait\"")
        self.layout = ParamLayout.from_scenario(scenario)
        self.rounds = scenario.run.rounds
        self.work_layout = make_work_layout(
            [len(i) for i in federation_of(scenario).client_indices], scheme=SCHEMES[o.scheme], s=o.s,
            sequential=o.sequential, B=o.B, W=o.W, lam=o.lam, rounds=self.rounds, seed=self.seed)
        self.code, self.sched, self.T = self.work_layout.code, self.work_layout.sched, self.work_layout.T
        #: dtype of the coded messages: float64 unless each is one piece gradient (coded_math.message_dtype)
        self.message_dtype = message_dtype(self.code.B, o.precision)
        self.N = self.work_layout.total
        self.time_model = ComputeTimeModel(o.base_time, o.jitter, o.straggler_delay, o.overhead)
        self.pattern = draw_stragglers(o.stragglers, numpy_rng(self.seed, "coded-stragglers", o.stragglers), n,
                                       self.rounds, p=o.p, p_good_to_bad=o.p_good_to_bad, p_bad_to_good=o.p_bad_to_good,
                                       B=o.B, W=o.W, lam=o.lam, p_start=o.p_start, p_continue=o.p_continue)
        self.noise = self.time_model.noise(numpy_rng(self.seed, "coded-time"), self.rounds, n)
        self.interleaved = self.sched is not None and o.jobs == "interleaved"
        # mutable state (state_dict)
        self.sim_total = 0.0
        self.replicas: list[list[np.ndarray]] = []     # model(s) in server precision
        self.steps: list[int] = []                     # GD steps applied to each replica
        self.shown = 0                                 # the replica returned as the global model
        self.versions: dict[int, list[np.ndarray]] = {}
        self.results: dict[tuple[int, str, int, int], np.ndarray] = {}
        # this round
        self.work: dict[int, list[Work]] = {}
        self._round_record: ArrayRecord | None = None  # job r's model, if not the global arrays
        self._old_records: dict[int, ArrayRecord] = {}
        self._round_metrics: dict[str, float | int] = {}

    def _replica_of(self, job: int) -> int:
        return job % len(self.replicas) if self.interleaved else 0

    # ------------------------------------------------------------------ hooks of a train round
    def prepare_round(self, server_round: int) -> None:
        """This round's work; the model replicas (first round) and job ``r``'s model version."""
        if not self.replicas:
            f64 = self.options.precision == "float64"
            start = [np.array(a, dtype=np.float64 if f64 and a.dtype.kind == "f" else a.dtype, copy=True)
                     for a in self.current]
            self.replicas = [[a.copy() for a in start] for _ in range(self.T + 1 if self.interleaved else 1)]
            self.steps = [0] * len(self.replicas)
        r = server_round - 1
        self.work = self.work_layout.round_work(r)
        model = self.replicas[self._replica_of(r)]       # job r's model
        if self.sched is not None and self.sched.job_exists(r):
            self.versions[r] = [a.copy() for a in model]
        plain = self.options.precision == "float32" and not self.interleaved
        self._round_record = None if plain else self.to_record(model)
        self._old_records = {}

    def sample(self, server_round: int, grid: Grid, fraction: float | None = None) -> list[tuple[int, int]]:
        picks = super().sample(server_round, grid, fraction)
        if fraction is not None:                         # an evaluation round: every sampled client
            return picks
        return [(p, node) for p, node in picks if self.work.get(p)]   # none for a drained worker

    def train_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        tasks = self.work_layout.task_list(self.work.get(partition_id, []))
        return {"tasks": json.dumps(tasks), "job": server_round - 1, "precision": self.options.precision,
                "transport": np.dtype(self.message_dtype).name}

    def train_arrays(self, server_round: int, partition_id: int, arrays: ArrayRecord) -> ArrayRecord:
        return arrays if self._round_record is None else self._round_record

    def train_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        """The older model versions (``model.{job}``) of this worker's pending jobs."""
        out = {}
        for job in sorted({w.job for w in self.work[partition_id]} - {server_round - 1}):
            if job not in self._old_records:
                self._old_records[job] = self.to_record(self.versions[job])
            out[f"model.{job}"] = self._old_records[job]
        return out

    def parse_reply(self, content: RecordDict, metrics: dict[str, Any], pid: int) -> list[np.ndarray]:
        work = self.work.get(pid)
        if work is None:
            raise ClientUpdateError(pid, "partition-id", "not a worker of this round")
        want = [str(k) for k in range(len(work))]
        rec = content.array_records.get(CODED_RECORD)
        if rec is not None and list(rec.keys()) != want:
            raise ClientUpdateError(pid, CODED_RECORD,
                                    f"keys {list(rec.keys())[:5]} != {want[:5]} (one array per task)")
        dtype = self.message_dtype
        return [np.asarray(expect_array(content, pid, CODED_RECORD, k, dtype=dtype, shape=(self.layout.dim,)),
                           dtype=np.float64) for k in want]

    def min_replies(self) -> int:
        return 0      # stragglers and missing workers are the decoder's business

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray] | None:
        """Close the round on the simulated clock, decode what it allows, and take a GD step of the
        replica of every decoded job; ``None`` (model unchanged) when nothing decoded."""
        r = server_round - 1
        by_pid = {u.partition_id: u for u in updates if u.partition_id in self.work}
        active = sorted(p for p, w in self.work.items() if w)
        loads = [self.work_layout.samples(self.work[p]) / self.N for p in active]
        t = self.time_model.times(np.asarray(loads, dtype=np.float64), self.pattern[r, active], self.noise[r, active])
        times = {p: float(x) for p, x in zip(active, t)}
        m: dict[str, float | int] = {
            "worker-load-mean": float(sum(loads) / self.num_partitions), "worker-load-max": max(loads, default=0.0),
            "nominal-load": float(self.work_layout.nominal_load), "stragglers": int(self.pattern[r].sum()),
            "code-amplification": float(self.code.amplification),
            "transport-bits": 8 * np.dtype(self.message_dtype).itemsize}
        if self.sched is None:
            end = end_gc_round(self.work_layout, server_round, {p: u.arrays[0] for p, u in by_pid.items()}, times,
                               self.pattern[r], self.options.on_excess)
        else:
            end = end_sequential_round(self.work_layout, server_round, {p: u.arrays for p, u in by_pid.items()},
                                       self.work, times, self.options.mu, self.results, self.layout.dim)
            done, oldest = set(end.decoded_jobs), r + 1 - self.T   # older jobs are never referenced again
            self.results = {k: v for k, v in self.results.items() if k[0] not in done and k[0] >= oldest}
            self.versions = {j: v for j, v in self.versions.items() if j >= oldest and j not in done}
        for p, u in by_pid.items():
            if p in end.late:
                self.record_failure(server_round, p, "straggler", f"straggler (simulated {times[p]:.3f} s): "
                                    f"{end.late[p]}", node=u.node_id)
            else:
                u.metrics.update({"used": int(p in end.used), "straggler": int(bool(end.flags[p])),
                                  "sim-time": float(times[p])})
        for reason in end.errors:
            self.record_failure(server_round, None, "aggregation", reason)
        m.update(end.metrics)
        self.sim_total += end.round_time
        m["sim-round-time"] = float(end.round_time)
        m["sim-total-time"] = float(self.sim_total)
        m["num-clients"] = len(end.used)
        m["num-examples"] = int(sum(by_pid[p].num_examples for p in end.used))
        self.last_updates = [by_pid[p] for p in sorted(by_pid) if "used" in by_pid[p].metrics]
        m["grad-norm"] = 0.0
        self._round_metrics = m
        if not end.grads:
            m["model-steps"] = self.steps[self.shown]
            return None
        for job, g in end.grads:             # job order; GD step of the job's replica
            k = self._replica_of(job)
            mean_grad = g / self.N
            x = self.layout.gather(self.keys, self.replicas[k]) - self.options.lr * mean_grad
            self.replicas[k] = self.layout.scatter(self.keys, self.replicas[k], x)
            self.steps[k] += 1
            m["grad-norm"] = float(np.linalg.norm(mean_grad))
        k = self.shown = self._replica_of(end.grads[-1][0])   # the global model: the replica updated last
        m["model-steps"] = self.steps[k]
        return [a.astype(c.dtype) for a, c in zip(self.replicas[k], self.current)]

    def train_metrics(self, updates: list[ClientUpdate]) -> dict[str, float | int]:
        return self._round_metrics

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
