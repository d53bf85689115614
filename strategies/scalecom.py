"""ScaleCom: cyclic local top-k with a shared index set and low-pass filtered error feedback.

Chen, Chen, Ni, Zhang, Wang, Lee, Gopalakrishnan, "ScaleCom: Scalable Sparsified Gradient Compression
for Communication-Efficient Distributed Training", NeurIPS 2020; math in
:mod:`fedsim.strategies.scalecom_math`, client memory in :mod:`fedsim.clients.plugins.scalecom`.

A round has two exchanges, as CLT-k has two communication steps (indices, then values):

1. **train** (``before_send``): every sampled client gets the global model, trains locally and forms
   ``a = m + Δ``; the round's leader (partition ``(t - 1) mod N``, or the next sampled one) answers
   with its per-tensor top-k indices of ``|a|`` (``k = ceil(density · n)``), the others with metrics.
2. **send** (the template's train exchange): each client gets the leader's indices (no model) and
   answers with ``a[I]`` (float32), then keeps ``m' = (1 - β) m + β (a - C(a))``. The server adds
   ``server_lr ·`` the example-weighted mean of the values, on the indices, to the global model.

With ``density = 1`` every coordinate is sent, the memory stays 0, and the round is FedAvg (up to
float rounding: the server adds the mean update instead of averaging models). Non-floating tensors
(BatchNorm's ``num_batches_tracked`` counter) are not sent and keep the server's value. If the leader
fails in the first exchange the round sends nothing (the model stays; every client's whole ``a``
goes to its memory). Byzantine faults are refused (the attack model is written for dense models).
``β``'s default (0.1) is our choice; the paper's value could not be checked from a stored source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedsim.clients.plugins.scalecom import ScaleCom as ScaleComPlugin
from fedsim.clients.tasks import CLIENT_TASKS, ClientCall
from fedsim.clients.trainer import train_local
from fedsim.config import Scenario
from fedsim.errors import ClientUpdateError, ConfigError
from fedsim.strategies.base import ClientUpdate, FedSimStrategy, register_strategy
from fedsim.strategies.replies import expect_array
from fedsim.strategies.scalecom_math import aggregate_sparse, clt_k_indices, layer_k, leader_of, segments_of
from fedsim.wire import from_numpy, to_numpy

RECORD = "scalecom"
PHASE = "scalecom-phase"


def _plugin(stack) -> ScaleComPlugin:
    found = [p for p in stack.plugins if isinstance(p, ScaleComPlugin)]
    if not found:
        raise ConfigError("client.plugins", "the scalecom task runs without the scalecom plugin",
                          "run it through strategy.name = \"scalecom\", which enables the plugin")
    return found[0]


@CLIENT_TASKS.register("scalecom")
def scalecom_task(call: ClientCall) -> RecordDict:
    """Phase ``train``: local training, ``a = m + Δ``, the leader's indices. Phase ``send``: ``a[I]``."""
    stack = call.plugins()
    plugin = _plugin(stack)
    if call.config.get(PHASE) == "train":
        model = call.load_global()
        x, y = call.data()
        res = train_local(model, x, y, call.scenario.client, stack, round=call.round, client_id=call.partition_id,
                          seed=call.scenario.run.seed, rng=call.rng("train"), config=call.config,
                          progress=call.progress(), progress_span=call.progress_span(), probe_rng=call.probe_rng(stack))
        plugin.counts = np.array([res.num_examples, res.steps], np.int64)
        content: dict[str, Any] = {"metrics": call.reply_metrics(**res.metrics)}
        if int(call.config.get("scalecom-leader", 0)):
            sizes = [v.numel() for v in model.state_dict().values() if v.is_floating_point()]
            idx = clt_k_indices(plugin.pending, segments_of(sizes), float(call.config["scalecom-density"]))
            content[RECORD] = ArrayRecord({"indices": from_numpy(idx.astype(np.int32))})
        call.save_plugins(stack)
        return RecordDict(content)
    idx = to_numpy(call.msg.content.array_records[RECORD]["indices"]).astype(np.int64)
    values = plugin.send(idx, float(call.config["scalecom-beta"]))
    n, steps = (int(c) for c in plugin.counts)
    call.save_plugins(stack)
    return RecordDict({RECORD: ArrayRecord({"values": from_numpy(values)}), "metrics": call.reply_metrics(
        **{"num-examples": n, "steps": steps, "sim-time": call.simulated_time(steps)})})


@register_strategy
class ScaleComStrategy(FedSimStrategy):
    """Server side of ScaleCom (see the module docstring)."""

    name = "scalecom"
    train_action = "train.scalecom"
    client_plugins = ("scalecom",)

    @dataclass(frozen=True)
    class Options:
        """density: share of each tensor's coordinates sent (0, 1]; beta: low-pass filter of the error
        memory (0, 1], 1 = standard error feedback; server_lr: step on the mean sparse update."""

        density: float = 0.1
        beta: float = 0.1
        server_lr: float = 1.0

        def __post_init__(self) -> None:
            layer_k(1, self.density)  # raises for a density outside (0, 1]
            if not 0.0 < self.beta <= 1.0:
                raise ValueError(f"beta must be in (0, 1], got {self.beta}")
            if not (self.server_lr > 0 and math.isfinite(self.server_lr)):
                raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def __init__(self, scenario: Scenario, options: Any | None = None) -> None:
        super().__init__(scenario, options)
        if scenario.faults.byzantine_clients:
            raise ConfigError("faults.byzantine_clients", "strategy scalecom does not run fedsim's Byzantine "
                              "attacks (they corrupt dense models, ScaleCom sends sparse error-compensated "
                              "updates)", "use strategy.name = \"fedavg\" or a robust strategy for attacks")
        self.indices = np.zeros(0, np.int64)
        self.leader: int | None = None

    def _floating(self) -> list[int]:
        return [i for i, a in enumerate(self.current) if a.dtype.kind == "f"]

    def train_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        return {PHASE: "send", "scalecom-beta": float(self.options.beta)}

    def train_arrays(self, server_round: int, partition_id: int, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord()  # the model went out in the first exchange

    def before_send(self, server_round: int, msgs: list[Message], grid: Any) -> list[Message]:
        """The first exchange (training, leader's indices); the indices then go into ``msgs``."""
        self.indices, self.leader = np.zeros(0, np.int64), None
        if not msgs:
            return msgs
        self.leader = leader_of(server_round, self.sampled, self.num_partitions)
        model = self.to_record(self.current)
        first = []
        for m in msgs:
            cfg = dict(m.content.config_records["config"])
            cfg.update({PHASE: "train", "scalecom-density": float(self.options.density),
                        "scalecom-leader": int(self.directory.get(m.metadata.dst_node_id) == self.leader)})
            first.append(Message(RecordDict({"arrays": model, "config": ConfigRecord(cfg)}),
                                 dst_node_id=m.metadata.dst_node_id, message_type=self.train_action))
        why = "no reply in the training exchange"
        for r in grid.send_and_receive(first, timeout=self.timeout):
            if self.directory.get(r.metadata.src_node_id) != self.leader:
                continue
            try:
                why = str(r.error.reason)[-300:] if r.has_error() else ""
                self.indices = [] if why else self._check_indices(r.content)
            except ClientUpdateError as err:
                why = err.message
        if why:
            self.indices = np.zeros(0, np.int64)
            self.record_failure(server_round, None, "leader", f"leader (client {self.leader}) gave no indices: "
                                f"{why}; nothing is sent this round, updates stay in the clients' memories")
        for m in msgs:
            m.content[RECORD] = ArrayRecord({"indices": from_numpy(self.indices.astype(np.int32))})
        return msgs

    def _check_indices(self, content: RecordDict) -> np.ndarray:
        idx = expect_array(content, self.leader, RECORD, "indices", dtype=np.int32).astype(np.int64)
        floating = self._floating()
        segments = segments_of([self.current[i].size for i in floating])
        want = sum(layer_k(n, self.options.density) for _, n in segments)
        counts = [int(((idx >= s) & (idx < s + n)).sum()) for s, n in segments]
        if (idx.ndim != 1 or len(idx) != want or np.any(np.diff(idx) <= 0)
                or counts != [layer_k(n, self.options.density) for _, n in segments]):
            raise ClientUpdateError(self.leader, f"{RECORD}.indices", f"{len(idx)} indices, expected {want} "
                                    "ascending, k per tensor", "the leader must send its per-tensor top-k")
        return idx

    def parse_reply(self, content: RecordDict, metrics: dict[str, Any], pid: int) -> list[np.ndarray]:
        return [expect_array(content, pid, RECORD, "values", dtype=np.float32, shape=(len(self.indices),))]

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray] | None:
        if not len(self.indices):
            return None
        floating = self._floating()
        weights = [u.num_examples for u in updates]
        size = sum(self.current[i].size for i in floating)
        step = aggregate_sparse([u.arrays[0] for u in updates], weights, self.indices, size)
        new = list(self.current)
        for i, (start, n) in zip(floating, segments_of([self.current[i].size for i in floating])):
            a = self.current[i]
            new[i] = (a.astype(np.float64) + self.options.server_lr * step[start:start + n].reshape(a.shape)
                      ).astype(a.dtype)
        return new

    def train_metrics(self, updates: list[ClientUpdate]) -> dict[str, float | int]:
        out = super().train_metrics(updates)
        out["scalecom/leader"] = -1 if self.leader is None else int(self.leader)
        out["scalecom/sent-coordinates"] = int(len(self.indices))
        return out
