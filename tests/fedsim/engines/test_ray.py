"""Ray engine (Flower's Simulation Engine): same scenario and seed give the local engine's metrics."""

import pytest

from fedsim.results import read_jsonl
from tests.conftest import tiny

pytestmark = pytest.mark.slow


def test_ray_matches_local(tmp_path):
    pytest.importorskip("ray")
    from fedsim.engines.local import run_local
    from fedsim.engines.ray import run_ray

    s = tiny(["run.rounds=2", "faults.crash_clients=[2]", "faults.crash_rounds=[2]"])
    local = run_local(s, tmp_path / "local")
    ray = run_ray(s, tmp_path / "ray")
    assert ray["status"] == "completed"
    for key in ("test_loss", "test_accuracy", "train_loss"):
        assert ray["final"][key] == pytest.approx(local["final"][key], abs=1e-6), key
    rows_l = read_jsonl(tmp_path / "local" / "metrics.jsonl")
    rows_r = read_jsonl(tmp_path / "ray" / "metrics.jsonl")
    assert [r["test_loss"] for r in rows_l] == pytest.approx([r["test_loss"] for r in rows_r], abs=1e-6)
    bad = [c for c in read_jsonl(tmp_path / "ray" / "clients.jsonl") if c["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["client"] == 2 and bad[0]["round"] == 2


@pytest.mark.parametrize("name, extra", [
    ("fedld", []),
    ("semifl", ["data.server_labelled=40", "strategy.tau=0.0", "strategy.server_epochs=1"]),
    ("signsgd", ["strategy.b=0.03"]),
    ("dp_fedavg", ['privacy.mechanism="dp-fedavg"', "privacy.noise_multiplier=0.5"]),
])
def test_core_strategies_run_on_ray_like_local(name, extra, tmp_path):
    """The published methods run unchanged on Flower's Simulation Engine, with the local engine's metrics."""
    pytest.importorskip("ray")
    from fedsim.engines.local import run_local
    from fedsim.engines.ray import run_ray

    s = tiny(["run.rounds=1", f'strategy.name="{name}"', *extra])
    local = run_local(s, tmp_path / "local")
    ray = run_ray(s, tmp_path / "ray")
    assert ray["status"] == "completed"
    assert ray["final"]["test_loss"] == pytest.approx(local["final"]["test_loss"], abs=1e-6)


def _link_state_with_messages(monkeypatch, num_nodes: int, partitions: list[int]):
    """Flower's in-memory link state as ``run_simulation`` sets it up, ``num_nodes`` registered nodes and
    one ``train`` message pushed (through Flower's ``InMemoryGrid``) per entry of ``partitions``."""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 11, NOOP_FEDERATION_ID
    for key, value in {"_task_id": 1, "_run_id": run.run_id, "_node_id": SUPERLINK_NODE_ID}.items():
        monkeypatch.setattr(TaskIdentity, key, value)  # as run_simulation sets them
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=run.run_id)
    mapping = vce_api._register_nodes(num_nodes=num_nodes, state_factory=factory)
    node_of = {p: n for n, p in mapping.items()}
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    ids = list(grid.push_messages([Message(RecordDict(), dst_node_id=node_of[p], message_type="train")
                                   for p in partitions]))
    return state, mapping, ids


def test_the_message_feed_asks_only_nodes_holding_a_message_and_delivers_as_flowers_loop(monkeypatch):
    """The Ray engine's feed (fedsim.engines.ray._feed_nodes_with_messages) hands over every pushed
    message exactly once, one per node and tick in Flower's node order, asking Flower's link state
    only about the nodes that hold one (Flower's own loop asks all of them every 0.1 s)."""
    pytest.importorskip("ray")
    import queue
    import threading

    from flwr.server.superlink.fleet.vce import vce_api

    from fedsim.engines.ray import _feed_nodes_with_messages, _lean_message_feed

    def fed(loop, partitions):
        state, mapping, ids = _link_state_with_messages(monkeypatch, 200, partitions)
        asked: list[int] = []
        real = state.get_message_ins
        state.get_message_ins = lambda node_id, limit: asked.append(node_id) or real(node_id=node_id, limit=limit)
        out, stop = queue.Queue(), threading.Event()
        worker = threading.Thread(target=loop, args=(state, out, mapping, stop))
        worker.start()
        threading.Event().wait(0.45)  # four ticks or more
        stop.set()
        worker.join(timeout=5)
        assert not worker.is_alive()
        got = [out.get_nowait() for _ in range(out.qsize())]
        return ([mapping[m.metadata.dst_node_id] for m in got], sorted(m.metadata.message_id for m in got),
                sorted(ids), [mapping[n] for n in asked])

    partitions = [150, 3, 77, 3, 42]  # partition 3 holds two messages: the second goes a tick later
    ours, ours_ids, pushed, asked = fed(lambda *a: _feed_nodes_with_messages(*a, fallback=None), partitions)
    flowers, flowers_ids, pushed_f, asked_f = fed(vce_api.add_messages_to_queue, partitions)
    assert ours_ids == pushed and flowers_ids == pushed_f  # every message handed over, each once
    assert ours == flowers == [3, 42, 77, 150, 3]  # Flower's node order; one message per node and tick
    assert asked == [3, 42, 77, 150, 3]  # only the nodes holding a message, once per message
    assert len(asked_f) >= 4 * 200  # Flower's loop asks every node on every tick

    class Foreign:  # a link state other than Flower's in-memory one gets Flower's loop
        pass

    called = []
    _feed_nodes_with_messages(Foreign(), None, {}, threading.Event(), fallback=lambda *a: called.append(a))
    assert len(called) == 1
    original = vce_api.add_messages_to_queue
    with _lean_message_feed():
        assert vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original
