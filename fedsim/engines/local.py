"""The embedded engine: an in-process Flower ``Grid`` that calls the ClientApp directly.

No Ray, no sockets: ``push_messages`` runs the ClientApp for each message in order, with one
persistent :class:`flwr.app.Context` per node, and turns a client exception into an error reply
(``Error`` code 2, as Flower does), so a failing client never stops the run.

With ``run.vectorize = true`` a :class:`~fedsim.clients.batched.BatchedFit` first takes the push's
eligible plain ``train`` messages and trains those clients together in vectorised calls; every
other message (and any client the batcher declines) still goes through the ClientApp one by one.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
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
        # (a test or tool that wraps ``_handle`` on the instance sees every message one by one)
        if self.batcher is not None and "_handle" not in self.__dict__ and len(todo) > 1:
            try:
                done = self.batcher.run([(msg, self.contexts[node]) for _, msg, node in todo])
            except Exception:  # noqa: BLE001 - the per-message path below reports any real error
                done = [None] * len(todo)
        for (mid, msg, node), content in zip(todo, done):
            if content is not None:
                self._replies[mid] = self._finish(Message(content, reply_to=msg), msg, self.contexts[node])
                continue
            try:
                self._replies[mid] = self._handle(msg, self.contexts[node])
            except SystemExit:  # the client process died: no reply, and the node is gone
                self.dead.add(node)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
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

    def kill(self, partition_id: int) -> None:
        """Simulate a node that died: it disappears and never answers again."""
        self.dead.add(node_id_for(partition_id))


def _is_expected(exc: BaseException) -> bool:
    from fedsim.errors import FedSimError

    return isinstance(exc, FedSimError)


def run_local(scenario, out_dir, on_round=None, grid_hook=None) -> dict:
    """Run ``scenario`` on the embedded engine: the real ServerApp and ClientApp, one process."""
    from flwr.app import Context

    from fedsim.catalog import resolve
    from fedsim.clients.client_app import build_client_app
    from fedsim.server import build_server_app

    resolve(scenario)
    result: dict = {}
    client_app = build_client_app(scenario)
    server_app = build_server_app(scenario, out_dir, engine="local", on_round=on_round, result=result)
    batcher = None
    if getattr(scenario.run, "vectorize", False):
        from fedsim.clients.batched import BatchedFit

        batcher = BatchedFit(scenario)
    grid = LocalGrid(client_app, scenario.data.num_clients, batcher=batcher)
    if grid_hook is not None:
        grid_hook(grid)
    server_app(grid, Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config={}))
    return result
