"""``FedSimStrategy`` on a grid that knows its nodes' partitions (local and Ray engines, a deployment's
run-config ``node-partitions``): no message is sent to map nodes, a node the grid does not list yet
waits (or, in a complete directory, is refused), and the seeded sample is a function of the scenario
and round only — the same partitions whatever the node ids are."""

from __future__ import annotations

import pytest

from fedsim.errors import ConfigError
from fedsim.strategies import base
from fedsim.strategies.node_directory import KnownNodesGrid, format_node_partitions, parse_node_partitions
from tests.conftest import tiny
from tests.strategies.test_base import server_identity  # noqa: F401  (autouse: messages need a task identity)


class KnownGrid:
    """A grid with a published ``node_partitions`` (possibly not yet complete) that refuses messages."""

    def __init__(self, partitions: dict[int, int], live: list[int] | None = None):
        self.node_partitions = partitions
        self.live = list(partitions) if live is None else live

    def get_node_ids(self):
        return list(self.live)

    def send_and_receive(self, msgs, timeout=None):  # pragma: no cover - must never be called
        raise AssertionError(f"{[m.metadata.message_type for m in msgs]} sent to map nodes")


def _strategy(n: int, fraction: float = 0.5):
    return base.make_strategy(tiny(data={"num_clients": n}, strategy={"fraction_train": fraction,
                                                                     "min_train_clients": 2},
                                   run={"round_timeout": 1.0}))


def test_a_node_not_yet_published_waits_without_any_message():
    strategy = _strategy(4)
    grid = KnownGrid({}, live=[501, 502, 503, 504])  # nodes up, mapping not published yet
    strategy.discover(grid)
    assert strategy.directory == {} and not strategy.failures and not strategy.refused_nodes
    grid.node_partitions = {501: 2, 502: 0, 503: 3, 504: 1}
    strategy.discover(grid)
    assert strategy.directory == {501: 2, 502: 0, 503: 3, 504: 1} and not strategy.failures


def test_seeded_sample_is_the_same_partitions_whatever_the_node_ids():
    a, b = _strategy(20), _strategy(20)
    grid_a = KnownGrid({1000 + p: p for p in range(20)})
    grid_b = KnownGrid({(p * 7919 + 13) << 20: p for p in reversed(range(20))})
    for rnd in (1, 2, 3):
        picks_a, picks_b = a.sample(rnd, grid_a), b.sample(rnd, grid_b)
        assert [p for p, _ in picks_a] == [p for p, _ in picks_b] and len(picks_a) == 10
        assert all(grid_a.node_partitions[n] == p for p, n in picks_a)
        assert all(grid_b.node_partitions[n] == p for p, n in picks_b)
    assert [p for p, _ in a.sample(1, grid_a)] != [p for p, _ in a.sample(2, grid_a)]


def test_the_engine_mapping_still_refuses_a_second_holder_of_a_partition():
    strategy = _strategy(3)
    strategy.discover(KnownGrid({11: 0, 12: 1, 13: 2}))
    strategy.discover(KnownGrid({11: 0, 12: 1, 13: 2, 14: 1}))  # a later node claims partition 1
    assert strategy.directory == {11: 0, 12: 1, 13: 2}
    [record] = [f.to_json() for f in strategy.failures]
    assert record["status"] == "duplicate-partition" and record["node_id"] == 14


def test_on_a_deployment_a_node_that_cannot_answer_whoami_is_named_in_the_quorum_error():
    """Only a grid without the mapping (a real deployment) asks ``query.whoami``; a vanilla ClientApp
    answers it with an error, and the run stops saying so instead of a bare 'not reachable'."""
    from flwr.app import Error, Message

    from fedsim.errors import QuorumError

    class DeployLike:
        asked = 0

        def get_node_ids(self):
            return [77, 78]

        def send_and_receive(self, msgs, timeout=None):
            msgs = list(msgs)
            DeployLike.asked += len(msgs)
            for i, m in enumerate(msgs):
                m.metadata.__dict__["_message_id"] = f"q-{i}"
            return [Message(Error(code=2, reason="no query.whoami handler"), reply_to=m) for m in msgs]

    strategy = _strategy(2)
    with pytest.raises(QuorumError) as err:
        strategy.sample(1, DeployLike())
    assert DeployLike.asked >= 2 and strategy.directory == {}
    assert "query.whoami" in str(err.value) and "no query.whoami handler" in str(err.value)


# ------------------------------------------------------------------ a deployment's run-config node directory
def test_node_partitions_round_trip_through_the_run_config_text():
    claims = {2**64 - 1: (1, 2), 8312: (0, 2), 55: (0, 0)}
    text = format_node_partitions(claims)
    assert text == "55:0/0,8312:0/2,18446744073709551615:1/2"  # by partition, then node id
    assert parse_node_partitions(text) == claims
    assert parse_node_partitions(" 7:0/1 ") == {7: (0, 1)}


@pytest.mark.parametrize("text, words", [
    (5, "must be a string"),
    ("", "is not NODE_ID:PARTITION_ID/NUM_PARTITIONS"),
    ("7:0", "is not NODE_ID"),
    ("7:0/2,,8:1/2", "is not NODE_ID"),
    ("-7:0/2", "is not NODE_ID"),
    ("0:0/2", "outside Flower's"),
    (f"{2**64}:0/2", "outside Flower's"),
    ("7:0/2,7:1/2", "listed twice"),
    ("7:2/2", "not below its num-partitions 2"),
])
def test_a_malformed_node_partitions_is_a_config_error_naming_the_key(text, words):
    with pytest.raises(ConfigError, match=words) as err:
        parse_node_partitions(text)
    assert err.value.key == "run-config.node-partitions"


class _Info:
    def __init__(self, node_id: int, at: str):
        self.node_id, self.last_activated_at = node_id, at


class _Deployment:
    """A deployment's grid: live nodes with activation times, and no message may be sent."""

    def __init__(self, live: dict[int, str]):
        self.live = live

    def get_node_ids(self):
        return list(self.live)

    def get_nodes(self):
        return [_Info(n, at) for n, at in self.live.items()]

    def send_and_receive(self, msgs, timeout=None):  # pragma: no cover - must never be called
        raise AssertionError(f"{[m.metadata.message_type for m in msgs]} sent to map nodes")


def test_a_complete_directory_maps_without_messages_and_refuses_what_it_does_not_list():
    """``fedsim deploy``'s ``node-partitions``: listed nodes map as their node configs say; an unlisted
    node, a second holder (the later activated one, whatever the listing order) and a node whose
    num-partitions is another federation's are refused and recorded, each once."""
    strategy = _strategy(3)
    live = {90: "2025-01-01T00:00:05", 91: "2025-01-01T00:00:01", 92: "2025-01-01T00:00:02",
            93: "2025-01-01T00:00:03", 94: "2025-01-01T00:00:04"}
    claims = {90: (0, 3), 91: (1, 3), 92: (0, 3), 94: (2, 2)}  # 93 unlisted; 90 and 92 both hold 0
    grid = KnownNodesGrid(_Deployment(live), claims)
    strategy.discover(grid)
    strategy.discover(grid)  # refused nodes are never looked at again
    assert strategy.directory == {91: 1, 92: 0}
    got = {(f.node_id, f.kind) for f in strategy.failures}
    assert got == {(93, "unlisted-node"), (90, "duplicate-partition"), (94, "invalid-partition")}
    assert len(strategy.failures) == 3 and all(f.partition_id is None for f in strategy.failures)
    dup = next(f for f in strategy.failures if f.kind == "duplicate-partition")
    assert "92" in dup.reason and "90" in dup.reason
