"""Bytes on the wire: the figures in metrics.jsonl and clients.jsonl are the serialised sizes of the
messages that really went through the grid, recomputed here the way a SuperNode stores them."""

from collections import defaultdict

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_object_tree, iterate_object_tree

from fedsim.engines.local import run_local
from fedsim.results import read_jsonl
from fedsim.strategies.wire_bytes import MeteredGrid, message_bytes
from fedsim.wire import from_numpy
from tests.conftest import tiny


def stored_size(msg: Message) -> int:
    """Size of ``msg`` as an object store holds it: each distinct object of its tree, deflated once."""
    objects = {}

    def walk(obj):
        objects[obj.object_id] = obj
        for child in (obj.children or {}).values():
            walk(child)

    walk(msg)
    ids = {t.object_id for t in iterate_object_tree(get_object_tree(msg))}
    assert ids == set(objects)
    return sum(len(objects[i].deflate()) for i in ids)


def run_and_spy(overrides, tmp_path):
    """Run a tiny scenario; return (per (round, node): [down, up] as recomputed, metrics rows, client rows)."""
    seen: list[tuple[list[Message], list[Message]]] = []

    def hook(grid):
        inner = grid.send_and_receive

        def spy(messages, *, timeout=None):
            msgs = list(messages)
            replies = list(inner(msgs, timeout=timeout))
            seen.append((msgs, replies))
            return replies

        grid.send_and_receive = spy

    assert run_local(tiny(overrides), tmp_path, grid_hook=hook)["status"] == "completed"
    by = defaultdict(lambda: [0, 0])
    for msgs, replies in seen:
        for m in msgs:
            rnd = int(m.content.config_records["config"]["server-round"])
            by[(rnd, m.metadata.dst_node_id)][0] += stored_size(m)
        sent = {m.metadata.message_id: m for m in msgs}
        for r in replies:
            rnd = int(sent[r.metadata.reply_to_message_id].content.config_records["config"]["server-round"])
            by[(rnd, r.metadata.src_node_id)][1] += stored_size(r)
    return by, read_jsonl(tmp_path / "metrics.jsonl"), read_jsonl(tmp_path / "clients.jsonl")


def check_reported(by, rows, clients):
    assert clients and all(c["status"] == "ok" for c in clients)
    for c in clients:
        assert [c["downlink_bytes"], c["uplink_bytes"]] == by[(c["round"], c["node_id"])], c
    for row in rows[1:]:
        mine = [v for (rnd, _), v in by.items() if rnd == row["round"]]
        assert row["downlink_bytes"] == sum(d for d, _ in mine)
        assert row["uplink_bytes"] == sum(u for _, u in mine)


def test_reported_bytes_equal_the_serialised_messages_on_fedavg(tmp_path):
    by, rows, clients = run_and_spy(["strategy.min_train_clients=4"], tmp_path)
    check_reported(by, rows, clients)
    assert len(clients) == 8 and all(c["uplink_bytes"] > 4 * 1210 for c in clients)  # 1210 float32 parameters


@pytest.mark.slow
def test_signsgd_sends_one_bit_per_coordinate_up(tmp_path):
    by, rows, clients = run_and_spy(['strategy.name="signsgd"', "strategy.min_train_clients=4"], tmp_path / "s")
    check_reported(by, rows, clients)
    _, plain_rows, _ = run_and_spy(["strategy.min_train_clients=4"], tmp_path / "f")
    sign_up, fedavg_up = rows[-1]["uplink_bytes"], plain_rows[-1]["uplink_bytes"]
    # 1210 signs packed in 152 bytes against 4840 bytes of float32 (plus per-message overhead)
    assert sign_up < fedavg_up / 4, (sign_up, fedavg_up)
    assert fedavg_up - sign_up > 4 * (4840 - 152) * 0.95


def test_message_bytes_grows_with_the_payload_and_counts_shared_content_once_per_message():
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        def msg(arrays):
            return Message(RecordDict({"arrays": ArrayRecord({k: from_numpy(v) for k, v in arrays.items()}),
                                       "config": ConfigRecord({"server-round": 1})}),
                           dst_node_id=7, message_type="train")

        small = message_bytes(msg({"w": np.zeros(10, np.float32)}))
        big = message_bytes(msg({"w": np.zeros(1010, np.float32)}))
        assert 4000 <= big - small <= 4016  # the payload, and a few more digits in lengths and shapes
        x = np.arange(1000, dtype=np.float32)
        twice = message_bytes(msg({"a": x, "b": x.copy()}))
        once = message_bytes(msg({"a": x}))
        assert 0 < twice - once < 1000  # the second copy is the same object: only its record entry is new
        assert message_bytes(m := msg({"w": x})) == stored_size(m)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_metered_grid_is_the_wrapped_grid_otherwise():
    class Grid:
        node_partitions = {1: 0}

        def get_node_ids(self):
            return [1]

    g = Grid()
    m = MeteredGrid(g)
    assert m.node_partitions == {1: 0} and m.get_node_ids() == [1]
    m.extra = 3
    assert g.extra == 3
    assert m.meter.take() == {}
