"""Bytes on the wire: the figures in metrics.jsonl and clients.jsonl are the serialised sizes of the
messages that really went through the grid, recomputed here the way a SuperNode stores them; the
size computed from lengths (``wire_size``) equals ``Σ len(deflate())`` on every message."""

import contextlib
import math
from collections import defaultdict

import flwr.app.message.array as array_module
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_object_tree, iterate_object_tree
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.catalog import registries
from fedsim.engines.local import run_local
from fedsim.results import read_jsonl
from fedsim.strategies.wire_bytes import MeteredGrid, message_bytes, message_bytes_reference
from fedsim.strategies.wire_size import Unsupported, fast_message_bytes
from fedsim.wire import from_numpy
from tests.conftest import tiny

CHUNK = array_module.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE


@contextlib.contextmanager
def task_identity():
    """The identity a Message constructor reads (set by Flower inside a run)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@contextlib.contextmanager
def chunk_size(n):
    """Flower's array chunk size (read by ``Array.slice_array`` and by ``wire_size``) set to ``n``."""
    array_module.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE = n
    try:
        yield
    finally:
        array_module.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE = CHUNK


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
    with task_identity():
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


# ---------------------------------------------------------------- fast size == Σ len(deflate())
DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int64", "bool", "complex64"]
NAMES = st.text(max_size=5) | st.text(min_size=126, max_size=130)  # escapes in JSON; 2-byte length varints
INT64 = st.integers(-2**63, 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
INTS = st.integers(-2**63, 2**64 - 1)  # above 2**63 - 1 Flower sends uint64
FLOATS = st.sampled_from([0.0, -0.0, math.nan]) | st.floats()  # proto3 writes -0.0 and nan, not 0.0


@st.composite
def arrays(draw):
    """An Array as fedsim, Flower (np.save) or a hand-made record builds it; sizes around the chunk size."""
    how = draw(st.sampled_from(["fedsim", "flower", "zeros", "raw"]))
    if how == "raw":  # arbitrary dtype/stype strings, and payloads shared with other arrays
        return Array(dtype=draw(st.text(max_size=4)), shape=tuple(draw(st.lists(st.integers(0, 9), max_size=2))),
                     stype=draw(st.sampled_from(["numpy.ndarray", "raw", "é\\"])),
                     data=draw(st.sampled_from([b"", b"\x00" * 300, b"ab" * 40, bytes(range(40))]) | st.binary()))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 7), max_size=3)))  # () is 0-d, a 0 makes it empty
    n = math.prod(shape) * dtype.itemsize
    if how == "zeros":
        x = np.zeros(shape, dtype)
    else:
        raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, n, dtype=np.uint8)
        x = raw.view(dtype).reshape(shape)
    return from_numpy(x) if how != "flower" else Array(x)


def scalar_lists(config):
    lists = [st.lists(FLOATS, max_size=4), st.lists(INT64, max_size=4), st.lists(UINT64, max_size=4)]
    if config:
        lists += [st.lists(st.booleans(), max_size=4), st.lists(st.text(max_size=4), max_size=4),
                  st.lists(st.binary(max_size=4), max_size=4),
                  st.tuples(INT64, st.lists(st.booleans(), max_size=2)).map(lambda t: [t[0], *t[1]])]
    return st.one_of(*lists)


def config_records():
    value = st.one_of(INTS, FLOATS, st.booleans(), st.text(max_size=6), st.binary(max_size=6), scalar_lists(True),
                      st.binary(min_size=100, max_size=300))
    return st.dictionaries(NAMES, value, max_size=4).map(ConfigRecord)


def metric_records():
    return st.dictionaries(NAMES, st.one_of(INTS, FLOATS, scalar_lists(False)), max_size=4).map(MetricRecord)


@st.composite
def record_dicts(draw):
    pool = draw(st.lists(arrays(), min_size=1, max_size=4))

    def pick(d):  # an array of the pool, an equal copy, or its payload under another dtype (chunks shared)
        a = d(st.sampled_from(pool))
        how = d(st.sampled_from(["same", "copy", "other dtype"]))
        dtype = a.dtype + "x" if how == "other dtype" else a.dtype
        return a if how == "same" else Array(dtype=dtype, shape=a.shape, stype=a.stype, data=bytes(a.data))

    records = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["arrays", "config", "metrics", "again"]))
        if kind == "arrays":
            records.append(ArrayRecord({draw(NAMES): pick(draw) for _ in range(draw(st.integers(0, 3)))}))
        elif kind == "config":
            records.append(draw(config_records()))
        elif kind == "metrics":
            records.append(draw(metric_records()))
        elif records:  # a record twice, or an equal copy of it: one object on the wire
            r = draw(st.sampled_from(records))
            records.append(r if draw(st.booleans()) else type(r)(dict(r)))
    names = draw(st.lists(NAMES, min_size=len(records), max_size=len(records), unique=True))
    return RecordDict(dict(zip(names, records)))


@st.composite
def messages(draw):
    kind = draw(st.sampled_from(["instruction", "reply", "error"]))
    msg = Message(draw(record_dicts()), dst_node_id=draw(UINT64),
                  message_type=draw(st.sampled_from(["train", "evaluate", "query", "train.noisy_gradient"])),
                  group_id=draw(st.text(max_size=4)))
    md = msg.metadata.__dict__
    md["_message_id"] = draw(st.text(max_size=8))  # blanked in deflate; a reply carries it over
    md["_run_id"], md["_src_node_id"] = draw(UINT64), draw(UINT64)
    md["_created_at"], md["_ttl"] = draw(FLOATS | st.integers(0, 2**40)), draw(FLOATS | st.integers(0, 2**40))
    md["_src_task_id"], md["_dst_task_id"] = draw(st.none() | UINT64), draw(st.none() | UINT64)
    if kind == "reply":
        return Message(draw(record_dicts()), reply_to=msg)
    if kind == "error":
        return Message(Error(draw(INT64), draw(st.none() | st.text(max_size=6))), reply_to=msg)
    return msg


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fast_size_equals_the_serialised_size_of_random_messages(data):
    with task_identity(), chunk_size(data.draw(st.sampled_from([CHUNK, 1, 7, 64, 150]))):
        msg = data.draw(messages())
        assert fast_message_bytes(msg) == message_bytes_reference(msg) == stored_size(msg)


def test_fast_size_of_arrays_larger_than_one_real_chunk():
    """At Flower's own 5 MiB chunks: zeros repeat whole chunks (one object each), random data does not."""
    n = (3 * CHUNK - 128) // 4  # a 128-byte .npy header: exactly three chunks, the last two all zeros
    rng = np.random.default_rng(0)
    with task_identity():
        for x in (np.zeros(n, np.float32), rng.standard_normal(n).astype(np.float32), np.zeros(n + 7, np.float32)):
            a = from_numpy(x)
            msg = Message(RecordDict({"a": ArrayRecord({"w": a, "v": from_numpy(x[:1000])})}),
                          dst_node_id=3, message_type="train")
            assert fast_message_bytes(msg) == message_bytes_reference(msg) == stored_size(msg)
        assert len(a.slice_array()) == 4 and len(a.children) == 3  # zeros(n + 7): chunks A, B, B, C


def test_what_the_fast_rules_do_not_cover_is_measured_by_the_reference():
    class Custom(ConfigRecord):  # its class name is in its header: not a ConfigRecord to the fast rules
        pass

    with task_identity():
        custom = Message(RecordDict({"c": Custom({"x": 1})}), dst_node_id=2, message_type="train")
        odd = Message(RecordDict({"m": MetricRecord({"x": 1})}), dst_node_id=2, message_type="train")
        odd.metadata.__dict__["_run_id"] = np.uint64(5)  # Flower takes it (an integer), the fast rules do not
        for msg in (custom, odd):
            with pytest.raises(Unsupported):
                fast_message_bytes(msg)
            assert message_bytes(msg) == message_bytes_reference(msg) == stored_size(msg)
        refused = Message(RecordDict({"c": ConfigRecord({"x": 2**64})}), dst_node_id=2, message_type="train")
        with pytest.raises(ValueError, match="out of range"):  # Flower cannot send it: no size is made up
            message_bytes(refused)


STRATEGIES = sorted(registries()["strategies"].names()) + ["flwr:FedAvg"]


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_reports_the_bytes_of_its_messages(name, tmp_path):
    """Each message a strategy sends or receives is sized by the fast rules (no fallback), and the run's
    totals are the sizes of those messages as an object store holds them."""
    cls = registries()["strategies"].get(name)
    sets = [f'strategy.name="{name}"', "data.num_clients=6", "strategy.min_train_clients=6",
            *getattr(cls, "tiny_overrides", ())]
    sent: list[Message] = []
    received: list[Message] = []

    def hook(grid):
        inner = grid.send_and_receive

        def spy(messages, *, timeout=None):
            msgs = list(messages)
            replies = list(inner(msgs, timeout=timeout))
            sent.extend(msgs)
            received.extend(replies)
            return replies

        grid.send_and_receive = spy

    assert run_local(tiny(sets), tmp_path, grid_hook=hook)["status"] == "completed"
    assert sent and received
    for m in sent + received:
        assert fast_message_bytes(m) == message_bytes_reference(m)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert sum(r.get("downlink_bytes", 0) for r in rows) == sum(stored_size(m) for m in sent)
    assert sum(r.get("uplink_bytes", 0) for r in rows) == sum(stored_size(m) for m in received)
