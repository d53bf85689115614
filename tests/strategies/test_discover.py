"""The node directory of ``strategies/base.py`` (``FedSimStrategy.discover`` / ``available``).

A node says which partition it serves (``query.whoami``); the server must not let a second node take a
partition over (found in issue 9: the last claimant won, the real node was dropped unrecorded). Property:
whatever the claims, the reply order and the activation times, each valid partition goes to its earliest
activated claimant, every other claimant is refused exactly once with a record naming it (and, for a
duplicate, the holder), refused nodes are never asked or sampled again, and a node that could not answer
is asked again. Also here, because Flower 1.39 exposes no message size limit: an oversize reply is
refused by the reply checks.
"""

from __future__ import annotations

import importlib
import random
from datetime import datetime, timedelta, timezone

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.strategies import base
from fedsim.wire import from_numpy
from tests.conftest import tiny

catalog = importlib.import_module("fedsim.catalog")
FAST = settings(max_examples=60, deadline=None)
N = 4  # partitions of the federation under test
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
GLOBAL = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2), "b": np.zeros(2, np.float32)}


from tests.strategies.test_base import server_identity  # noqa: E402,F401  (autouse: messages need a task identity)


def make_strategy(num_clients: int = N, min_train: int = 1):
    scenario = tiny(data={"num_clients": num_clients}, strategy={"min_train_clients": min_train},
                    run={"round_timeout": 1.0})
    return getattr(catalog, "make_strategy", base.make_strategy)(scenario)


class WhoamiGrid:
    """A deployment-like grid: nodes answer ``query.whoami`` with their claim (``None``: an error
    reply), replies come back in a shuffled order, ``get_nodes`` reports activation times."""

    def __init__(self, claims: dict[int, dict | None], activated: dict[int, int | None], seed: int = 0):
        self.claims, self.activated = dict(claims), dict(activated)
        self.asked: list[list[int]] = []  # node ids of each whoami batch
        self.rng = random.Random(seed)

    def get_node_ids(self) -> list[int]:
        return list(self.claims)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, last_activated_at="" if self.activated.get(n) is None
                         else (T0 + timedelta(seconds=self.activated[n])).isoformat()) for n in self.claims]

    def send_and_receive(self, msgs, timeout=None):
        msgs = list(msgs)
        assert {m.metadata.message_type for m in msgs} == {"query.whoami"}
        self.asked.append([m.metadata.dst_node_id for m in msgs])
        replies = []
        for i, m in enumerate(msgs):
            m.metadata.__dict__["_message_id"] = f"whoami-{i}"
            claim = self.claims[m.metadata.dst_node_id]
            replies.append(Message(Error(code=1, reason="busy"), reply_to=m) if claim is None else
                           Message(RecordDict({"metrics": MetricRecord(claim)}), reply_to=m))
        self.rng.shuffle(replies)
        return replies


def node_id(i: int) -> int:
    return 7_000 + 131 * i  # node ids unrelated to partition ids


claim_st = st.one_of(
    st.builds(lambda p: {"partition-id": p, "num-partitions": N}, st.integers(0, N - 1)),  # valid, often shared
    st.builds(lambda p: {"partition-id": p}, st.integers(0, N - 1)),  # no num-partitions: still valid
    st.builds(lambda p: {"partition-id": p, "num-partitions": N}, st.sampled_from([-1, N, 10**6])),  # out of range
    st.builds(lambda p: {"partition-id": p, "num-partitions": N + 3}, st.integers(0, N - 1)),  # other federation
    st.just({"partition-id": 0.5, "num-partitions": N}), st.just({"num-partitions": N}),  # no integer id
    st.none(),  # the node could not answer this time
)


def is_valid(claim: dict) -> bool:
    pid = claim.get("partition-id")
    return isinstance(pid, int) and 0 <= pid < N and claim.get("num-partitions", 0) in (0, N)


@FAST
@given(st.lists(st.tuples(claim_st, st.one_of(st.none(), st.integers(0, 50))), min_size=1, max_size=9),
       st.integers(0, 2**16))
def test_each_partition_keeps_its_first_claimant_and_every_other_claimant_is_recorded(nodes, seed):
    claims = {node_id(i): c for i, (c, _) in enumerate(nodes)}
    activated = {node_id(i): t for i, (_, t) in enumerate(nodes)}
    grid = WhoamiGrid(claims, activated, seed)
    strategy = make_strategy()

    strategy.discover(grid)

    order = list(claims)
    rank = {n: (activated[n] is None, activated[n] or 0, order.index(n)) for n in order}
    winners: dict[int, int] = {}
    for n in sorted((n for n in order if claims[n] is not None and is_valid(claims[n])), key=rank.get):
        winners.setdefault(claims[n]["partition-id"], n)
    assert strategy.directory == {n: p for p, n in winners.items()}, "the earliest activated claimant keeps it"
    failures = {f.node_id: f for f in strategy.failures}
    assert len(failures) == len(strategy.failures), "one record per refused node"
    answered = {n for n in order if claims[n] is not None}
    assert set(failures) == answered - set(winners.values())
    for n, f in failures.items():
        assert f.partition_id is None and str(n) in f.reason
        if is_valid(claims[n]):
            holder = winners[claims[n]["partition-id"]]
            assert f.kind == "duplicate-partition" and str(holder) in f.reason and holder != n
        else:
            assert f.kind == "invalid-partition" and f"0..{N - 1}" in f.reason
    assert strategy.available(grid, len(winners)) == winners

    grid.asked.clear()
    strategy.discover(grid)  # refused and mapped nodes are never asked again; silent ones are
    unanswered = [n for n in order if claims[n] is None]
    assert grid.asked == ([unanswered] if unanswered else [])
    assert len(strategy.failures) == len(failures), "a refusal is recorded once"


def test_a_later_node_never_takes_a_partition_over():
    """The first claimant keeps its partition even against a node that claims it later with an
    earlier activation time (it reconnected, or lies); the later one is refused and never sampled."""
    real, other, impostor = node_id(0), node_id(1), node_id(2)
    grid = WhoamiGrid({real: {"partition-id": 0, "num-partitions": 2}, other: {"partition-id": 1}},
                      {real: 10, other: 11})
    strategy = make_strategy(num_clients=2, min_train=2)
    strategy.server_round = 3
    strategy.discover(grid)
    assert strategy.directory == {real: 0, other: 1} and not strategy.failures
    grid.claims[impostor], grid.activated[impostor] = {"partition-id": 0, "num-partitions": 2}, 1

    arrays = ArrayRecord({k: from_numpy(v) for k, v in GLOBAL.items()})
    for rnd in (1, 2):
        strategy.server_round = rnd
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), grid))
        assert sorted(m.metadata.dst_node_id for m in msgs) == sorted([real, other]), "the impostor is never sampled"
    assert strategy.directory == {real: 0, other: 1}
    assert strategy.refused_nodes.keys() == {impostor}
    assert grid.asked == [[real, other], [impostor]], "asked once, then never again"


def test_duplicate_record_carries_the_round_and_reaches_the_round_records():
    real, dup = node_id(0), node_id(1)
    grid = WhoamiGrid({dup: {"partition-id": 1, "num-partitions": 2}, real: {"partition-id": 1, "num-partitions": 2}},
                      {dup: 9, real: 2})  # the grid lists the later-activated node first
    strategy = make_strategy(num_clients=2, min_train=1)
    strategy.server_round = 5
    msgs = list(strategy.configure_train(5, ArrayRecord({k: from_numpy(v) for k, v in GLOBAL.items()}),
                                         ConfigRecord({}), grid))
    assert [m.metadata.dst_node_id for m in msgs] == [real]
    [record] = [f.to_json() for f in strategy.failures]
    assert record["round"] == 5 and record["client"] is None and record["node_id"] == dup
    assert record["status"] == "duplicate-partition" and str(real) in record["reason"]


def test_the_local_engine_mapping_is_taken_as_is_without_whoami():
    class LocalLike:
        node_partitions = {11: 0, 12: 1, 13: 2}

        def get_node_ids(self):
            return [13, 11, 12]

        def send_and_receive(self, msgs, timeout=None):  # pragma: no cover - must not be called
            raise AssertionError("whoami sent although the grid knows the mapping")

    strategy = make_strategy(num_clients=3)
    strategy.discover(LocalLike())
    assert strategy.directory == {11: 0, 12: 1, 13: 2} and not strategy.failures


def test_an_oversize_reply_is_refused_by_the_reply_checks():
    """Flower 1.39 sets no usable message size limit (gRPC max message length hard-coded to 2 GiB - 1,
    messages split into objects): the bound on what is aggregated is the reply check against the
    global model's shapes."""
    strategy = make_strategy(num_clients=2)
    strategy.set_global(ArrayRecord({k: from_numpy(v) for k, v in GLOBAL.items()}))
    strategy.directory = {node_id(0): 0, node_id(1): 1}
    sent = []
    for pid in (0, 1):
        m = Message(RecordDict({"arrays": strategy.to_record(strategy.current)}), dst_node_id=node_id(pid),
                    message_type=strategy.train_action)
        m.metadata.__dict__["_message_id"] = f"train-{pid}"
        sent.append(m)
    strategy._sent, strategy.sampled = sent, [0, 1]
    big = {"w": np.ones(2_000_000, np.float32), "b": GLOBAL["b"]}  # 8 MB where 24 bytes are expected

    def reply(msg, arrays):
        return Message(RecordDict({"arrays": ArrayRecord({k: from_numpy(v) for k, v in arrays.items()}),
                                   "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    updates = strategy.collect(1, [reply(sent[0], big), reply(sent[1], GLOBAL)])
    assert [u.partition_id for u in updates] == [1]
    [failure] = strategy.failures
    assert (failure.partition_id, failure.kind) == (0, "invalid")
    assert "arrays.w" in failure.reason and "(2000000,)" in failure.reason
