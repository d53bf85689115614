"""``FedSimStrategy`` on a grid that knows its nodes' partitions (local and Ray engines): no message is
sent to map nodes, a node the grid does not list yet waits, and the seeded sample is a function of
the scenario and round only — the same partitions whatever the node ids are."""

from __future__ import annotations

from fedsim.strategies import base
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
    import pytest
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
