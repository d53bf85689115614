"""Common base of fedsim strategies: a ``flwr.serverapp.strategy.Strategy`` with the parts every
algorithm needs and Flower leaves out, as one template (Flower's ``Strategy`` is the anchor).

* Nodes are mapped to partition ids without contacting them where the grid knows the mapping
  (``node_partitions``: local and Ray engines, ``flwr run`` simulations, ``fedsim deploy`` with node
  authentication; :mod:`fedsim.strategies.node_directory`); only on a deployment whose node ids
  were not known in advance is a node not yet known asked once (``query.whoami``). Sampling is seeded and done
  over partition ids, so results do not depend on random node ids, engine or reply order.
* Sampling waits for enough nodes with a deadline (``QuorumError`` after it), never forever.
* Every reply is validated (keys, shapes, dtypes, finiteness, weights) before aggregation; a bad
  reply, an error reply or a missing reply is recorded as a :class:`FailureRecord` and the round
  goes on without it.

``configure_train`` and ``aggregate_train`` are written once, here; an algorithm fills hooks:

==========================  =============================================================
hook                        when the template calls it (no-op / plain default)
==========================  =============================================================
``attach_server(server)``   once, before round 1, with the server runtime (model, data)
``sample(round, grid)``     picks ``[(partition id, node)]`` for the round
``train_config(round, p)``  extra config values of client ``p``'s train message
``train_arrays(round, p)``  the model record sent to ``p`` (the global model by default)
``train_records(round, p)`` further records of ``p``'s message (e.g. older model versions)
``before_send(round, ...)`` last look at the round's messages (SemiFL's static-BN exchange)
``parse_reply(...)``        a reply's content → the arrays ``aggregate`` gets
``min_replies()``           valid replies the round needs (the quorum), 0 = none
``aggregate(round, ups)``   validated updates, sorted by partition id → new global arrays
                            (``None``: the model stays as it is this round)
``train_metrics(ups)``      the round's metrics
``privacy_mechanisms()``    the DP mechanisms the strategy owns, for the run's ledger
``state_dict()``            strategy state that a resume needs
==========================  =============================================================

After each round ``last_updates`` holds the updates that counted and ``failures`` every client
that did not (error, timeout, invalid, sat-out, straggler) and round-level failures (quorum,
aggregation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import faults
from fedsim.config import Scenario
from fedsim.errors import AggregationError, ClientUpdateError, QuorumError
from fedsim.options import build_options
from fedsim.registry import Registry
from fedsim.rng import numpy_rng
from fedsim.clients.tasks import PLUGINS_KEY
from fedsim.strategies.node_directory import grid_claims
from fedsim.strategies.records import (  # noqa: F401  (the records every strategy imports from here)
    ClientUpdate, FailureRecord, NoOptions, ServerStepOptions, require_mechanism, weighted_metrics)
from fedsim.strategies.replies import decode_sign_reply, expect_array, expect_count
from fedsim.wire import array_record, from_numpy, to_numpy

STRATEGIES: Registry = Registry("strategy")


def register_strategy(cls):
    """Class decorator registering a strategy under ``cls.name``."""
    return STRATEGIES.register(cls.name)(cls)


class FedSimStrategy(Strategy):
    """Base class; see the module docstring. ``Options`` is a frozen dataclass of the strategy's options."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    train_action: ClassVar[str] = "train"
    #: client plugins this strategy needs (enabled on clients automatically)
    client_plugins: ClassVar[tuple[str, ...]] = ()
    #: name of the reply's ArrayRecord holding the model (its keys must be the global model's)
    reply_array_key: ClassVar[str] = "arrays"
    #: smallest ``num-examples`` a valid reply may report
    min_num_examples: ClassVar[int] = 1
    #: whether a refused aggregation (``aggregation`` failure: the round left the model unchanged) is
    #: one of the method's own outcomes rather than a failed round (coded gradients: "wait or skip,
    #: never a wrong step", reported as ``decoded = 0``); otherwise it fails the round like a quorum
    aggregation_may_skip: ClassVar[bool] = False

    def __init__(self, scenario: Scenario, options: Any | None = None) -> None:
        self.scenario = scenario
        s = scenario.strategy
        self.options = options if options is not None else build_options(
            self.Options, s.options(), "strategy")
        self.fraction_train = s.fraction_train
        self.min_train_clients = s.min_train_clients
        self.fraction_evaluate = s.fraction_evaluate
        self.seed = scenario.run.seed
        self.num_partitions = scenario.data.num_clients
        self.timeout = scenario.run.round_timeout
        self.directory: dict[int, int] = {}  # node id -> partition id
        self.keys: list[str] = []
        self.current: list[np.ndarray] = []
        self.failures: list[FailureRecord] = []
        self.sampled: list[int] = []  # partition ids sampled this round
        self.last_updates: list[ClientUpdate] = []
        self._sent: list[Message] = []
        #: client plugins of a train round, sent in its config (``plugins``)
        self.plugin_list = ",".join(self.plugin_names(scenario))
        #: DP mechanisms this strategy owns (the ledger composes them; replies are checked against them)
        self.mechanisms: list[Any] = []
        self.server_round: int | None = None  # the round being configured (failure records carry it)
        self.refused_nodes: dict[int, str] = {}  # node id -> why it holds no partition (see discover)
        self.unanswered: dict[int, str] = {}  # node id -> its last error reply to query.whoami (deployment)

    # ------------------------------------------------------------------ node directory / sampling
    def discover(self, grid: Grid) -> None:
        """Map new nodes to partition ids; one node per partition.

        A grid that knows its nodes' partitions (``grid.node_partitions``, taken from the node configs
        the engine assigned: local, Ray, ``flwr run`` simulation, ``fedsim deploy`` with node
        authentication; see :func:`~fedsim.strategies.node_directory.grid_claims`) is read as it is, with
        no message at all; a node it does not list yet is left for a later call, or, when its mapping is
        complete (``node_partitions_complete``), refused as ``unlisted-node``. Only a grid without that
        mapping (a deployment whose node ids were not known in advance, where ``partition-id`` is each
        SuperNode's own node config) gets one ``query.whoami`` per node not yet known or refused; a node
        that could not answer is asked again on the next call.

        The first node to claim a partition keeps it (among new claimants of one call: the earliest
        activated, per the grid's ``NodeInfo.last_activated_at``, then the grid's order). A later
        claimant is refused and never asked or sampled again: a ``duplicate-partition`` failure
        naming both node ids (``client`` null: the node holds no partition). A claim outside
        ``0..data.num_clients-1`` or for another ``num-partitions`` is refused as ``invalid-partition``.
        Node authentication (``fedsim deploy``'s default) decides which nodes may join at all; this
        decides which one speaks for a partition. Records carry ``self.server_round`` (None if unset).
        """
        from datetime import datetime

        refused = self.refused_nodes
        order = [n for n in grid.get_node_ids() if n not in self.directory and n not in refused]
        if not order:
            return
        known = grid_claims(grid, order, self.num_partitions)  # the node configs, where the grid knows them
        claims: dict[int, tuple[Any, Any]] = {}  # node -> (partition id, num-partitions) as reported
        if known is not None:
            claims, unlisted = known
            for node in unlisted:
                refused[node] = (f"node {node} is not in this federation's node directory (the nodes whose "
                                 "partition the engine assigned); refused: it holds no partition")
                self.failures.append(FailureRecord(self.server_round, None, node, "unlisted-node", refused[node]))
        else:
            msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.whoami")
                    for n in order]
            for reply in grid.send_and_receive(msgs, timeout=self.timeout):
                if reply.has_error() and reply.metadata.src_node_id in order:
                    self.unanswered[reply.metadata.src_node_id] = str(reply.error.reason)[-200:]
                elif reply.metadata.src_node_id in order:
                    self.unanswered.pop(reply.metadata.src_node_id, None)
                    m = reply.content.metric_records.get("metrics") or {}
                    claims[reply.metadata.src_node_id] = (m.get("partition-id"), m.get("num-partitions", 0))
        activated: dict[int, float] = {}
        contested = known is None or len({pid for pid, _ in claims.values()}) < len(claims)
        if len(claims) > 1 and contested:  # who came first decides a partition two nodes claim
            for info in grid.get_nodes():
                try:
                    activated[info.node_id] = datetime.fromisoformat(info.last_activated_at).timestamp()
                except (AttributeError, TypeError, ValueError):  # a grid without activation times
                    pass
        rnd = self.server_round
        holder = {pid: node for node, pid in self.directory.items()}
        position = {n: i for i, n in enumerate(order)}  # not order.index: quadratic (300 s at 10⁵ nodes)
        for node in sorted(claims, key=lambda n: (n not in activated, activated.get(n, 0.0), position[n])):
            pid, total = claims[node]
            if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid < self.num_partitions
                    and total in (0, self.num_partitions)):
                why = (f"node {node} claimed partition-id={pid!r} num-partitions={total!r}; this federation has "
                       f"partitions 0..{self.num_partitions - 1} (data.num_clients={self.num_partitions}); refused")
                kind = "invalid-partition"
            elif pid in holder:
                why = (f"node {node} claimed partition {pid}, already held by node {holder[pid]} (the first "
                       f"claimant keeps it); node {node} refused: give each SuperNode its own partition-id")
                kind = "duplicate-partition"
            else:
                self.directory[node], holder[pid] = pid, node
                continue
            refused[node] = why
            self.failures.append(FailureRecord(rnd, None, node, kind, why))

    def available(self, grid: Grid, needed: int) -> dict[int, int]:
        """``{partition id: node id}`` of reachable nodes, waiting up to the deadline for ``needed``.
        A partition maps to the one node :meth:`discover` gave it, never to a refused claimant."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.discover(grid)
            live = set(grid.get_node_ids())
            by_pid: dict[int, int] = {}
            for node, pid in self.directory.items():
                if node in live:
                    by_pid.setdefault(pid, node)
            if len(by_pid) >= needed:
                return by_pid
            if time.monotonic() > deadline:
                silent = [n for n in self.unanswered if n not in self.directory]
                why = (f"; {len(silent)} node(s) answered query.whoami with an error (node {silent[0]}: "
                       f"{self.unanswered[silent[0]]})" if silent else "")
                raise QuorumError(
                    f"only {len(by_pid)} of the {needed} clients needed were reachable after "
                    f"{self.timeout:.0f} s{why}",
                    "start more nodes, lower strategy.min_train_clients, or raise run.round_timeout"
                    + ("; on a deployment whose node ids were not known in advance every SuperNode's "
                       "ClientApp must answer query.whoami with its partition-id (fedsim's ClientApp does; "
                       "another one serves where the node ids are known: local, Ray, flwr run simulation, "
                       "fedsim deploy with node authentication)" if silent else ""),
                )
            time.sleep(0.5)

    def sample_size(self, fraction: float | None = None) -> int:
        """Clients per round: ``max(floor(fraction·N), min_train_clients)``, at most N."""
        frac = self.fraction_train if fraction is None else fraction
        want = max(int(math.floor(frac * self.num_partitions)), self.min_train_clients)
        return min(want, self.num_partitions)

    def sample(self, server_round: int, grid: Grid, fraction: float | None = None) -> list[tuple[int, int]]:
        """Seeded sample of ``max(floor(fraction·N), min_train_clients)`` clients: ``[(pid, node)]``.

        Waits (up to the deadline) until at least ``min_train_clients`` nodes are reachable, then
        samples among the reachable ones; dead nodes are simply not sampled.
        """
        want = self.sample_size(fraction)
        by_pid = self.available(grid, min(self.min_train_clients, want))
        pids = sorted(by_pid)
        rng = numpy_rng(self.seed, "sample", server_round)
        chosen = sorted(int(p) for p in rng.choice(pids, size=min(want, len(pids)), replace=False))
        return [(p, by_pid[p]) for p in chosen]

    # ------------------------------------------------------------------ Flower Strategy interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.server_round = server_round
        self.set_global(arrays)
        self.failures = []
        self.last_updates = []
        self.prepare_round(server_round)
        picks = self.sample(server_round, grid)
        self.sampled = [p for p, _ in picks]
        msgs = []
        common = {**dict(config), "server-round": server_round, PLUGINS_KEY: self.plugin_list}
        for pid, node in picks:
            cfg = ConfigRecord({**common, **self.train_config(server_round, pid)})
            content = RecordDict({"arrays": self.train_arrays(server_round, pid, arrays), "config": cfg,
                                  **self.train_records(server_round, pid)})
            msgs.append(Message(content, dst_node_id=node, message_type=self.train_action))
        msgs = self.before_send(server_round, msgs, grid)
        self._sent = msgs
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = self.collect(server_round, list(replies))
        updates = faults.apply_omniscient_attack(self, server_round, updates)  # colluders see honest updates
        self.last_updates = updates
        need = self.min_replies()
        if len(updates) < need:
            self.record_failure(server_round, None, "quorum", f"{len(updates)} valid replies < quorum {need}; "
                                "model left unchanged this round")
            return None, MetricRecord({"num-clients": len(updates), "quorum-failed": 1})
        try:
            new = self.aggregate(server_round, updates)
        except AggregationError as err:
            self.record_failure(server_round, None, "aggregation", str(err))
            return None, MetricRecord({"num-clients": len(updates), "aggregation-failed": 1})
        if new is not None:
            self.current = [np.asarray(a) for a in new]
        metrics = MetricRecord(self.train_metrics(self.last_updates))
        return (self.to_record(self.current) if new is not None else None), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.server_round = server_round
        if self.fraction_evaluate <= 0:
            return []
        picks = self.sample(server_round, grid, self.fraction_evaluate)
        cfg = ConfigRecord({**dict(config), "server-round": server_round})
        return [Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=n, message_type="evaluate")
                for _, n in picks]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = [r for r in replies if not r.has_error() and "metrics" in r.content.metric_records]
        if not good:
            return None
        ms = [dict(r.content.metric_records["metrics"]) for r in good]
        return MetricRecord(weighted_metrics(ms))

    def summary(self) -> None:
        return None

    # ------------------------------------------------------------------ hooks for subclasses
    @classmethod
    def plugin_names(cls, scenario: Scenario) -> list[str]:
        """Client plugins of a plain train round: the scenario's, then this strategy's, then DP-SGD."""
        names = list(scenario.client.plugins)
        names += [p for p in cls.client_plugins if p not in names]
        if scenario.privacy.mechanism == "dp-sgd" and "dp_sgd" not in names:
            names.append("dp_sgd")
        return names

    def attach_server(self, server: Any) -> None:
        """Called once before round 1 with the server runtime (model, test and labelled data).
        With DP-SGD on the clients, the strategy takes the server's account of it (subclasses that
        override this call ``super().attach_server(server)``)."""
        if self.scenario.privacy.mechanism == "dp-sgd":
            from fedsim.privacy.mechanisms import DPSGDMechanism

            self.mechanisms.append(DPSGDMechanism(self.scenario, server.federation.client_sizes()))

    def prepare_round(self, server_round: int) -> None:
        """Called at the start of ``configure_train``, after the global model is set."""
        return None

    def train_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        """Extra per-client config values sent with the train message."""
        return {}

    def train_arrays(self, server_round: int, partition_id: int, arrays: ArrayRecord) -> ArrayRecord:
        """Arrays sent to one client (the global model by default)."""
        return arrays

    def train_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        """Further records of one client's train message, by name (none by default)."""
        return {}

    def before_send(self, server_round: int, msgs: list[Message], grid: Grid) -> list[Message]:
        """The round's train messages, just before they are sent (unchanged by default)."""
        return msgs

    def min_replies(self) -> int:
        """Valid replies the round needs before :meth:`aggregate` runs (``run.quorum`` of the sample)."""
        return max(math.ceil(self.scenario.run.quorum * max(len(self.sampled), 1)), 1)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray] | None:
        raise NotImplementedError

    def privacy_mechanisms(self) -> list[Any]:
        """The DP mechanisms this strategy owns (sampling, noise and accounting event together);
        the run's ledger composes what they report, and every reply is checked against them."""
        return list(self.mechanisms)

    def parse_reply(self, content: RecordDict, metrics: dict[str, Any], pid: int) -> list[np.ndarray]:
        """Turn a reply's content into the arrays :meth:`aggregate` gets, or raise
        :class:`ClientUpdateError`. By default: the full model under ``reply_array_key``."""
        record = content.get(self.reply_array_key)
        if not isinstance(record, ArrayRecord):
            raise ClientUpdateError(pid, self.reply_array_key, "missing from the reply",
                                    "the client task must return an ArrayRecord under this key")
        keys = list(record.keys())
        if keys != self.keys:
            missing = sorted(set(self.keys) - set(keys))
            extra = sorted(set(keys) - set(self.keys))
            raise ClientUpdateError(pid, self.reply_array_key, f"keys differ from the global model (missing "
                                    f"{missing[:3]}, unexpected {extra[:3]})", "the client must return the full state dict")
        return [expect_array(content, pid, self.reply_array_key, k, kind=ref.dtype.kind, shape=ref.shape)
                for k, ref in zip(self.keys, self.current)]

    def validate_weight(self, metrics: dict[str, Any], pid: int) -> int:
        return expect_count(metrics, pid, "num-examples", self.min_num_examples)

    # ------------------------------------------------------------------ helpers
    def set_global(self, arrays: ArrayRecord) -> None:
        self.keys = list(arrays.keys())
        self.current = [to_numpy(arrays[k]) for k in self.keys]

    def to_record(self, arrays: list[np.ndarray]) -> ArrayRecord:
        return array_record({k: from_numpy(a) for k, a in zip(self.keys, arrays)})

    def record_failure(self, server_round: int, pid: int | None, kind: str, reason: str, node: int = 0) -> None:
        """Record a client (``pid``) or round-level (``pid=None``) failure of this round."""
        self.failures.append(FailureRecord(server_round, pid, node, kind, reason))

    def collect(self, server_round: int, replies: list[Message]) -> list[ClientUpdate]:
        """Validate replies; record errors, invalid and missing replies; return updates sorted by pid."""
        node_of_msg = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        updates: list[ClientUpdate] = []
        answered: set[int] = set()
        for r in replies:
            node = node_of_msg.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            answered.add(node)
            pid = self.directory.get(node)
            if r.has_error():
                self.failures.append(FailureRecord(server_round, pid, node, "error", str(r.error.reason)[-500:]))
                continue
            try:
                rec = r.content.get("metrics")  # (``content.metric_records`` is a view Flower rebuilds per access)
                metrics = dict(rec) if isinstance(rec, MetricRecord) else {}
                pid = self._reply_partition(node, pid, metrics.get("partition-id"))
                if metrics.get("sat-out"):  # the client chose not to contribute (e.g. no confident sample)
                    self.failures.append(FailureRecord(server_round, pid, node, "sat-out",
                                                       str(metrics.get("reason", "client sat the round out"))))
                    continue
                content = decode_sign_reply(r.content, pid, {k: a.shape for k, a in zip(self.keys, self.current)})
                arrays = self.parse_reply(content, metrics, pid)
                n = self.validate_weight(metrics, pid)
                for mechanism in self.mechanisms:  # a private reply must say it did what is accounted
                    mechanism.check_reply(pid, metrics)
            except ClientUpdateError as err:
                self.failures.append(FailureRecord(server_round, pid, node, "invalid", err.message))
                continue
            updates.append(ClientUpdate(pid, node, arrays, n, metrics, content))
        for m in self._sent:
            if m.metadata.dst_node_id not in answered:
                node = m.metadata.dst_node_id
                self.failures.append(FailureRecord(server_round, self.directory.get(node), node, "timeout",
                                                   f"no reply within {self.timeout:.0f} s"))
        updates.sort(key=lambda u: u.partition_id)
        return updates

    @staticmethod
    def _reply_partition(node: int, pid: int | None, reported: Any) -> int:
        """The partition a reply speaks for: the one the directory gave its node, never a claim."""
        if pid is None:
            claimed = int(reported) if isinstance(reported, (int, float)) and not isinstance(reported, bool) else -1
            raise ClientUpdateError(claimed, "node", f"reply from node {node}, which holds no partition")
        if reported is not None and reported != pid:
            raise ClientUpdateError(pid, "metrics.partition-id", f"reported {reported!r} but node {node} holds "
                                    f"partition {pid}", "a node speaks only for the partition it registered")
        return pid

    def train_metrics(self, updates: list[ClientUpdate]) -> dict[str, float | int]:
        out: dict[str, float | int] = weighted_metrics([u.metrics for u in updates])
        out["num-clients"] = len(updates)
        out["num-examples"] = int(sum(u.num_examples for u in updates))
        times = [float(u.metrics.get("sim-time", 0.0)) for u in updates]
        out["sim-round-time"] = max(times) if times else 0.0
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Strategy state that a resume needs (server optimiser moments, flags...)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        return None


def make_strategy(scenario: Scenario) -> FedSimStrategy:
    """Instantiate the scenario's strategy with validated options."""
    cls = STRATEGIES.get(scenario.strategy.name, key="strategy.name")
    return cls(scenario)
