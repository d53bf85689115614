"""The reply-validation contract of ``strategies/base.py`` (``FedSimStrategy.collect``).

Honest replies are mixed with malformed ones (a missing or extra key, a wrong shape or dtype kind,
NaN/Inf, a bad ``num-examples``, an ``.npy`` header that disagrees with its payload, error
replies). Properties: each malformed reply is one failure record naming its client and the field;
each honest reply is kept; and FedAvg over what was kept equals FedAvg over the honest replies alone.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.strategies import base
from fedsim.wire import from_numpy
from tests.conftest import tiny

catalog = importlib.import_module("fedsim.catalog")
if getattr(catalog, "resolve", None) is None:  # before the resolver step existed, load_all filled the registries
    catalog.load_all()

FAST = settings(max_examples=30, deadline=None)
# the global model: two float tensors and an integer buffer (like BatchNorm's num_batches_tracked)
GLOBAL = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2), "b": np.zeros(2, np.float32),
          "steps": np.array(7, dtype=np.int64)}
FLOATS = ("w", "b")
ERROR_REASON = "ValueError: the client blew up"


def node_of(pid: int) -> int:
    return 1_000 + 37 * pid  # node ids unrelated to partition ids, as on a real grid


@pytest.fixture(autouse=True, scope="module")
def server_identity():
    """Messages can only be built inside a task; the local engine sets the same identity."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved


@functools.lru_cache(maxsize=None)
def scenario_with(num_clients: int):
    scenario = tiny(data={"num_clients": num_clients})
    return getattr(catalog, "resolve", lambda s: s)(scenario) or scenario


def make_fedavg(num_clients: int):
    scenario = scenario_with(num_clients)
    strategy = getattr(catalog, "make_strategy", base.make_strategy)(scenario)
    strategy.set_global(ArrayRecord({k: from_numpy(v) for k, v in GLOBAL.items()}))
    strategy.directory = {node_of(pid): pid for pid in range(num_clients)}
    return strategy


def send(strategy, pids: list[int]) -> dict[int, Message]:
    """The round's train messages, as ``configure_train`` leaves them in ``strategy._sent``."""
    sent = {}
    for pid in pids:
        msg = Message(RecordDict({"arrays": strategy.to_record(strategy.current),
                                  "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=node_of(pid), message_type=strategy.train_action)
        msg.metadata.__dict__["_message_id"] = f"train-{pid}"  # what the grid does on push
        sent[pid] = msg
    strategy._sent = list(sent.values())
    strategy.sampled = sorted(pids)
    return sent


def honest_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2).astype(np.float32),
            "steps": np.array(int(rng.integers(0, 100)), dtype=np.int64)}


def reply_content(arrays: dict[str, Array | np.ndarray], metrics: dict, record: str = "arrays") -> RecordDict:
    arrays = {k: v if isinstance(v, Array) else from_numpy(v) for k, v in arrays.items()}
    return RecordDict({record: ArrayRecord(arrays), "metrics": MetricRecord(metrics)})


def with_header_lie(good: np.ndarray, how: str) -> Array:
    """An ``Array`` whose declared dtype/shape disagree with its ``.npy`` payload."""
    if how == "shape":
        payload = from_numpy(good[None]).data  # the header says (1, *shape): same size, other shape
    elif how == "dtype":
        payload = from_numpy(good.astype(np.int32) if good.dtype.kind == "f" else good.astype(np.float32)).data
    else:  # truncated payload
        payload = from_numpy(good).data[:-1]
    return Array(dtype=str(good.dtype), shape=tuple(good.shape), stype="numpy.ndarray", data=payload)


# kind -> builder(arrays, metrics, key) -> (content or None for an error reply, words the reason must hold)
def _drop(arrays, metrics, key):
    return reply_content({k: v for k, v in arrays.items() if k != key}, metrics), ["'arrays'", key]


def _extra(arrays, metrics, key):
    return reply_content({**arrays, "bogus": np.ones(1, np.float32)}, metrics), ["'arrays'", "bogus"]


def _reshape(arrays, metrics, key):
    bad = np.zeros((*arrays[key].shape, 2), arrays[key].dtype)
    return reply_content({**arrays, key: bad}, metrics), [f"'arrays.{key}'", "shape"]


def _kind(arrays, metrics, key):
    a = arrays[key]
    bad = a.astype(np.int32) if a.dtype.kind == "f" else a.astype(np.float32)
    return reply_content({**arrays, key: bad}, metrics), [f"'arrays.{key}'", "dtype"]


def _poison(value):
    def build(arrays, metrics, key):
        key = key if key in FLOATS else "w"
        bad = arrays[key].copy()
        bad.flat[0] = value
        return reply_content({**arrays, key: bad}, metrics), [f"'arrays.{key}'", "NaN or Inf"]
    return build


def _count(value):
    def build(arrays, metrics, key):
        metrics = {k: v for k, v in metrics.items() if k != "num-examples"}
        if value is not None:
            metrics["num-examples"] = value
        return reply_content(arrays, metrics), ["'metrics.num-examples'"]
    return build


def _header(how):
    def build(arrays, metrics, key):
        return reply_content({**arrays, key: with_header_lie(arrays[key], how)}, metrics), [f"'arrays.{key}'"]
    return build


def _no_metrics(arrays, metrics, key):
    return RecordDict({"arrays": ArrayRecord({k: from_numpy(v) for k, v in arrays.items()})}), [
        "'metrics.num-examples'"]


def _no_record(arrays, metrics, key):
    return reply_content(arrays, metrics, record="model"), ["'arrays'", "missing"]


def _error(arrays, metrics, key):
    return None, [ERROR_REASON]


MALFORMED = {
    "missing key": _drop, "extra key": _extra, "wrong shape": _reshape, "wrong dtype kind": _kind,
    "NaN": _poison(np.nan), "Inf": _poison(-np.inf),
    "fractional count": _count(2.5), "zero count": _count(0), "negative count": _count(-3),
    "huge count": _count(10**15), "NaN count": _count(float("nan")), "list count": _count([5]),
    "missing count": _count(None), "no metrics": _no_metrics,
    "header shape lie": _header("shape"), "header dtype lie": _header("dtype"), "truncated payload": _header("truncated"),
    "no array record": _no_record, "error reply": _error,
}


@st.composite
def round_of_replies(draw):
    """``[(pid, kind, key)]``: at least one honest client; kinds of the others drawn freely."""
    kinds = ["honest"] + draw(st.lists(st.sampled_from(["honest", *MALFORMED]), min_size=1, max_size=7))
    pids = draw(st.permutations(range(len(kinds))))
    keys = draw(st.lists(st.sampled_from(sorted(GLOBAL)), min_size=len(kinds), max_size=len(kinds)))
    return list(zip(pids, kinds, keys))


def build_reply(msg: Message, pid: int, kind: str, key: str, rng: np.random.Generator,
                named: bool) -> tuple[Message, list[str], dict[str, np.ndarray], int]:
    arrays = honest_arrays(rng)
    count = int(rng.integers(1, 5_000))
    metrics = {"num-examples": count, "train_loss": float(rng.random())}
    if named:  # a client may say who it is; otherwise the directory tells
        metrics["partition-id"] = pid
    if kind == "honest":
        return Message(reply_content(arrays, metrics), reply_to=msg), [], arrays, count
    content, words = MALFORMED[kind](arrays, metrics, key)
    if content is None:
        return Message(Error(code=1, reason=ERROR_REASON), reply_to=msg), words, arrays, count
    return Message(content, reply_to=msg), words, arrays, count


@FAST
@given(round_of_replies(), st.integers(0, 2**32 - 1), st.booleans(), st.randoms(use_true_random=False))
def test_malformed_replies_are_recorded_and_honest_ones_aggregate_alone(clients, seed, named, order):
    rng = np.random.default_rng(seed)
    num_clients = len(clients)
    strategy = make_fedavg(num_clients)
    sent = send(strategy, [pid for pid, _, _ in clients])
    replies, expected_words, honest = [], {}, {}
    for pid, kind, key in clients:
        reply, words, arrays, count = build_reply(sent[pid], pid, kind, key, rng, named)
        replies.append(reply)
        if kind == "honest":
            honest[pid] = (arrays, count, reply)
        else:
            expected_words[pid] = (kind, words)
    order.shuffle(replies)

    updates = strategy.collect(1, replies)

    assert [u.partition_id for u in updates] == sorted(honest), "every honest reply is kept, in pid order"
    assert all(u.node_id == node_of(u.partition_id) for u in updates)
    by_client = {f.partition_id: f for f in strategy.failures}
    assert len(by_client) == len(strategy.failures) == len(expected_words), [vars(f) for f in strategy.failures]
    assert set(by_client) == set(expected_words), "each malformed reply is one failure of the right client"
    for pid, (kind, words) in expected_words.items():
        failure = by_client[pid]
        assert failure.kind == ("error" if kind == "error reply" else "invalid"), (kind, failure)
        assert failure.node_id == node_of(pid) and failure.round == 1
        assert all(word in failure.reason for word in words), (kind, words, failure.reason)

    alone = make_fedavg(num_clients)
    alone_sent = send(alone, sorted(honest))
    alone_updates = alone.collect(1, [Message(honest[p][2].content, reply_to=alone_sent[p]) for p in sorted(honest)])
    assert not alone.failures
    mixed_model = strategy.aggregate(1, updates)
    honest_model = alone.aggregate(1, alone_updates)
    for key, got, want in zip(strategy.keys, mixed_model, honest_model):
        assert got.dtype == want.dtype == GLOBAL[key].dtype and np.array_equal(got, want), key

    counts = np.array([honest[p][1] for p in sorted(honest)], dtype=np.float64)
    for i, key in enumerate(strategy.keys):  # and it is the example-weighted mean of the honest models
        stack = np.stack([honest[p][0][key].astype(np.float64) for p in sorted(honest)])
        mean = np.tensordot(counts / counts.sum(), stack, axes=1)
        assert np.allclose(mixed_model[i], mean, rtol=1e-5, atol=1e-5 if key in FLOATS else 0.5), key


@FAST
@given(st.one_of(st.integers(-10, 10**6), st.floats(-1e6, 1e6), st.sampled_from([np.nan, np.inf, -np.inf, 1e15, 10**15]),
                 st.just(None), st.text(max_size=3), st.lists(st.integers(0, 9), max_size=2), st.booleans()))
def test_validate_weight_accepts_exactly_the_positive_whole_counts(value):
    strategy = make_fedavg(4)
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value == value and value not in (float("inf"), float("-inf"))
        and value.is_integer())
    if whole and 1 <= value <= 10**6:
        assert strategy.validate_weight({"num-examples": value}, 2) == int(value)
        return
    from fedsim.errors import ClientUpdateError

    with pytest.raises(ClientUpdateError) as info:
        strategy.validate_weight({"num-examples": value}, 2)
    assert info.value.client == 2 and info.value.field == "metrics.num-examples"


def test_an_unparseable_declared_dtype_is_an_invalid_reply_not_a_crash():
    strategy = make_fedavg(2)
    sent = send(strategy, [0, 1])
    good = from_numpy(GLOBAL["w"])
    lying = Array(dtype="flaot32", shape=good.shape, stype=good.stype, data=good.data)
    replies = [Message(reply_content({**GLOBAL, "w": lying}, {"num-examples": 3}), reply_to=sent[0]),
               Message(reply_content(GLOBAL, {"num-examples": 3}), reply_to=sent[1])]
    updates = strategy.collect(1, replies)
    assert [u.partition_id for u in updates] == [1]
    assert [(f.partition_id, f.kind) for f in strategy.failures] == [(0, "invalid")]


def test_a_reply_speaks_only_for_the_partition_its_node_holds():
    """A node mapped to partition 1 that reports partition 0 is refused, never aggregated as client 0."""
    strategy = make_fedavg(3)
    sent = send(strategy, [0, 1])
    rng = np.random.default_rng(5)
    replies = [Message(reply_content(honest_arrays(rng), {"num-examples": 3, "partition-id": 0}), reply_to=sent[0]),
               Message(reply_content(honest_arrays(rng), {"num-examples": 3, "partition-id": 0}), reply_to=sent[1])]
    updates = strategy.collect(1, replies)
    assert [u.partition_id for u in updates] == [0]
    (failure,) = strategy.failures
    assert failure.partition_id == 1 and failure.kind == "invalid" and "partition-id" in failure.reason
