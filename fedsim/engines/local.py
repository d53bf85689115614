"""The embedded engine: an in-process Flower ``Grid`` that calls the ClientApp directly.

No Ray, no sockets: ``push_messages`` runs the ClientApp for each message in order, with one
persistent :class:`flwr.app.Context` per node, and turns a client exception into an error reply
(``Error`` code 2, as Flower does), so a failing client never stops the run.

By default (``run.vectorize = "auto"``; ``true`` forces it for conv models on CPU too) a
:class:`~fedsim.clients.batched.BatchedFit` first takes the push's eligible plain ``train`` messages
and trains those clients together in vectorised calls; every other message (and any client the
batcher declines) still goes through the ClientApp one by one. ``run.vectorize = false`` sends
every message through the ClientApp. What happened is :meth:`LocalGrid.vectorized`, which the
server writes to ``summary.json`` as ``vectorized``.

``run.round_timeout`` holds here too. Clients run one after another in this process, so each
client call's own wall time is measured and compared with the deadline, as if the clients ran in
parallel on their own nodes: a reply that took longer is dropped (the strategy records that client
as ``timeout``), and its duration is kept in :attr:`LocalGrid.late`. Clients trained together by the
batcher are each charged an equal share of the batch's time.

For a resume, :meth:`LocalGrid.export_state` packs every node's ``context.state`` (and the nodes
that died) for the checkpoint and :meth:`LocalGrid.restore_state` puts them back.
"""

from __future__ import annotations

import base64
import time
import traceback
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1
CLIENT_RAISED = 2


def node_id_for(partition_id: int) -> int:
    """Deterministic, non-trivial node ids (real ones are random 64-bit ints)."""
    return (partition_id * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (2**63 - 1) + 2


class LocalGrid(Grid):
    """In-process Grid over ``num_nodes`` virtual SuperNodes running ``client_app``."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1,
                 run_config: dict | None = None, batcher=None) -> None:
        self.client_app = client_app
        #: optional vectorised executor: ``batcher.run([(msg, context)]) -> [RecordDict | None]``
        self.batcher = batcher
        self._run = Run.create_empty(run_id)
        self.contexts: dict[int, Context] = {}
        for pid in range(num_nodes):
            node = node_id_for(pid)
            self.contexts[node] = Context(run_id=run_id, node_id=node,
                                          node_config={"partition-id": pid, "num-partitions": num_nodes},
                                          state=RecordDict(), run_config=dict(run_config or {}))
        self.dead: set[int] = set()
        self._replies: dict[str, Message] = {}
        #: the deadline of the exchange in progress (``send_and_receive``'s ``timeout``)
        self._deadline: float | None = None
        #: ``(node id, seconds)`` of every reply dropped for arriving after its deadline
        self.late: list[tuple[int, float]] = []
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID

    # --- Grid interface ---------------------------------------------------------------------
    def set_run(self, run_id: int) -> None:  # pragma: no cover - unused in-process
        self._run = Run.create_empty(run_id)

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    @property
    def node_partitions(self) -> dict[int, int]:
        """``{node id: partition id}`` — what a ``query.whoami`` round would return."""
        return {n: int(c.node_config["partition-id"]) for n, c in self.contexts.items()}

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.dead]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        todo: list[tuple[str, Message, int]] = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if node in self.dead or node not in self.contexts:
                continue  # a dead node never answers: the server's deadline handles it
            todo.append((mid, msg, node))
        done: list = [None] * len(todo)
        share = 0.0
        # (a test or tool that wraps ``_handle`` on the instance sees every message one by one)
        if self.batcher is not None and "_handle" not in self.__dict__ and len(todo) > 1:
            t0 = time.perf_counter()
            try:
                done = self.batcher.run([(msg, self.contexts[node]) for _, msg, node in todo])
            except Exception:  # noqa: BLE001 - the per-message path below reports any real error
                done = [None] * len(todo)
            share = (time.perf_counter() - t0) / max(sum(c is not None for c in done), 1)
        for (mid, msg, node), content in zip(todo, done):
            took = share
            if content is not None:
                reply = self._finish(Message(content, reply_to=msg), msg, self.contexts[node])
            else:
                t0 = time.perf_counter()
                try:
                    reply = self._handle(msg, self.contexts[node])
                except SystemExit:  # the client process died: no reply, and the node is gone
                    self.dead.add(node)
                    continue
                took = time.perf_counter() - t0
            if self._deadline is not None and took > self._deadline:
                self.late.append((node, took))  # past the round's deadline: the server never sees it
                continue
            self._replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Run every message's client and return the replies that came within ``timeout`` seconds
        (each client call timed on its own; ``None`` = no deadline)."""
        self._deadline = timeout
        try:
            ids = list(self.push_messages(messages))
        finally:
            self._deadline = None
        return self.pull_messages(ids)

    # --- helpers ------------------------------------------------------------------------------
    def _handle(self, msg: Message, context: Context) -> Message:
        saved = TaskIdentity.node_id
        try:
            TaskIdentity.node_id = context.node_id
            reply = self.client_app(msg, context)
        except Exception as exc:  # a client failure is data, not a crash of the run
            reason = f"{type(exc).__name__}: {exc}"
            if not _is_expected(exc):
                reason += " | " + traceback.format_exc(limit=3).replace("\n", " ")[-400:]
            reply = Message(Error(code=CLIENT_RAISED, reason=reason), reply_to=msg)
        finally:
            TaskIdentity.node_id = saved
        return self._finish(reply, msg, context)

    @staticmethod
    def _finish(reply: Message, msg: Message, context: Context) -> Message:
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
        reply.metadata.__dict__["_src_node_id"] = context.node_id
        reply.metadata.__dict__["_delivered_at"] = str(time.time())
        return reply

    def vectorized(self) -> dict:
        """``summary.json``'s ``vectorized``: whether the batched path trained clients, and why not."""
        if self.batcher is None:
            return {"used": False, "reason": self.no_batcher_reason}
        return self.batcher.summary()

    #: why :attr:`batcher` is ``None`` (set by :func:`run_local`)
    no_batcher_reason = "run.vectorize = false"

    def kill(self, partition_id: int) -> None:
        """Simulate a node that died: it disappears and never answers again."""
        self.dead.add(node_id_for(partition_id))

    # --- checkpoint / resume ------------------------------------------------------------------
    def export_state(self) -> tuple[tuple[dict[str, Any], dict[str, np.ndarray]], list[int]]:
        """``((description, arrays), dead partition ids)``: every node's ``context.state``, packed
        exactly by :func:`pack_states`, and the nodes that died (they stay dead after a resume)."""
        pids = self.node_partitions
        states = {pids[n]: c.state for n, c in self.contexts.items()}
        return pack_states(states), sorted(pids[n] for n in self.dead if n in pids)

    def restore_state(self, packed: tuple[dict[str, Any], dict[str, np.ndarray]], dead: list[int]) -> None:
        """Put back what :meth:`export_state` packed; a checkpoint of another federation is refused."""
        from fedsim.errors import CheckpointError

        try:
            states = unpack_states(*packed)
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"the checkpoint's client state cannot be read ({type(err).__name__}: {err})",
                                  "the checkpoint is corrupted; resume from an intact run directory") from None
        by_pid = {pid: node for node, pid in self.node_partitions.items()}
        if sorted(states) != sorted(by_pid) or not set(dead) <= set(by_pid):
            raise CheckpointError(f"the checkpoint holds client state for partitions {sorted(states)[:5]}…, the "
                                  f"federation has {len(by_pid)} nodes", "resume only the scenario that wrote the run")
        for pid, state in states.items():
            self.contexts[by_pid[pid]].state = state
        self.dead = {by_pid[p] for p in dead}


def _is_expected(exc: BaseException) -> bool:
    from fedsim.errors import FedSimError

    return isinstance(exc, FedSimError)


# --- node state in checkpoints ---------------------------------------------------------------
def pack_states(states: dict[int, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Serialise every node's ``context.state`` (a Flower ``RecordDict``) exactly: DP-SGD's
    per-client accountants and every plugin's state live there.

    Returns the JSON description (per partition id: records in order, config/metric values with
    bytes as base64 and non-finite floats spelled out) and the arrays for the ``.npz``: each
    ``Array``'s serialised bytes as ``uint8`` under ``<pid>/<record>/<item>``.
    """
    from fedsim.errors import CheckpointError

    meta: dict[str, Any] = {}
    blobs: dict[str, np.ndarray] = {}
    for pid, state in sorted(states.items()):
        records = []
        for i, (name, record) in enumerate(state.items()):
            if isinstance(record, ArrayRecord):
                items = []
                for j, (key, arr) in enumerate(record.items()):
                    blobs[f"{pid}/{i}/{j}"] = np.frombuffer(arr.data, dtype=np.uint8)
                    items.append({"key": key, "dtype": arr.dtype, "shape": list(arr.shape), "stype": arr.stype})
                records.append({"name": name, "kind": "array", "items": items})
            elif isinstance(record, (ConfigRecord, MetricRecord)):
                kind = "config" if isinstance(record, ConfigRecord) else "metric"
                records.append({"name": name, "kind": kind,
                                "values": [[k, _encode_value(v)] for k, v in record.items()]})
            else:
                raise CheckpointError(f"client {pid}: state record '{name}' is a {type(record).__name__}, which "
                                      "cannot be checkpointed", "keep client state in Array/Config/MetricRecords")
        meta[str(pid)] = records
    return meta, blobs


def unpack_states(meta: dict[str, Any], blobs: dict[str, np.ndarray]) -> dict[int, Any]:
    """Inverse of :func:`pack_states`."""
    out: dict[int, Any] = {}
    for pid, records in meta.items():
        state = RecordDict()
        for i, rec in enumerate(records):
            if rec["kind"] == "array":
                state[rec["name"]] = ArrayRecord({
                    item["key"]: Array(dtype=item["dtype"], shape=tuple(item["shape"]), stype=item["stype"],
                                       data=bytes(blobs[f"{pid}/{i}/{j}"]))
                    for j, item in enumerate(rec["items"])})
            else:
                cls = ConfigRecord if rec["kind"] == "config" else MetricRecord
                state[rec["name"]] = cls({k: _decode_value(v) for k, v in rec["values"]})
        out[int(pid)] = state
    return out


def _encode_value(v: Any) -> Any:
    if isinstance(v, list):
        return [_encode_value(x) for x in v]
    if isinstance(v, bytes):
        return {"b64": base64.b64encode(v).decode()}
    if isinstance(v, float) and not np.isfinite(v):
        return {"float": repr(v)}
    return v


def _decode_value(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode_value(x) for x in v]
    if isinstance(v, dict):
        return base64.b64decode(v["b64"]) if "b64" in v else float(v["float"])
    return v


def run_local(scenario, out_dir, on_round=None, grid_hook=None, resume: bool = False,
              client_app: ClientApp | None = None) -> dict:
    """Run ``scenario`` on the embedded engine: the real ServerApp and ClientApp, one process.
    ``resume=True`` continues the run in ``out_dir`` from its latest checkpoint.

    ``client_app``: any Flower ``ClientApp`` to serve as the clients (default: the scenario's
    ``run.client_app``, else fedsim's). Each node's ``context.node_config`` holds ``partition-id`` and
    ``num-partitions``, as in Flower's simulation; a vanilla app answers ``train`` with ``arrays`` and
    ``metrics.num-examples``. Such an app is always called message by message (the batched path stands
    in for fedsim's own training only; the reason is logged once and recorded in ``summary.json``), and
    a scenario asking fedsim's client side for something it would not do is refused before the run
    (:func:`~fedsim.clients.client_app.check_foreign_app`).
    """
    from flwr.app import Context

    from fedsim.catalog import resolve
    from fedsim.clients.client_app import build_client_app, check_foreign_app, describe_client_app, load_client_app
    from fedsim.server import build_server_app

    resolve(scenario)
    result: dict = {}
    if client_app is None and scenario.run.client_app:
        client_app = load_client_app(scenario.run.client_app)
    foreign = client_app is not None
    served = describe_client_app(client_app, scenario)
    if foreign:
        check_foreign_app(scenario, served)
    if client_app is None:
        client_app = build_client_app(scenario)
    server_app = build_server_app(scenario, out_dir, engine="local", on_round=on_round, result=result,
                                  resume=resume, client_app=served)
    batcher, why_not = None, "run.vectorize = false"
    if foreign and scenario.run.vectorize is not False:
        import logging

        why_not = "the ClientApp given is not fedsim's; the batched path stands in for fedsim's own training only"
        level = logging.WARNING if scenario.run.vectorize is True else logging.INFO
        logging.getLogger("flwr").log(level, "fedsim: run.vectorize: clients train one by one, because %s",
                                         why_not)
    elif scenario.run.vectorize is not False:
        from fedsim.clients.batched import batcher_for

        batcher = batcher_for(scenario)
    grid = LocalGrid(client_app, scenario.data.num_clients, batcher=batcher)
    grid.no_batcher_reason = why_not
    if grid_hook is not None:
        grid_hook(grid)
    server_app(grid, Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config={}))
    return result
