"""The Ray engine: Flower's Simulation Engine running the same ServerApp and ClientApp.

Client resources come from the scenario's ``[ray]`` section (default 1 CPU per client, so a
2-core machine runs 2 clients at a time instead of Flower's default of one; torch keeps
``run.threads`` = 1 thread per client, and Ray sets ``OMP_NUM_THREADS=1`` in its actors for a
vanilla ClientApp). Ray listens on loopback only here, and its logs stay quiet unless asked.

Node directory without messages
-------------------------------
Flower's simulation registers its virtual SuperNodes itself (``vce_api._register_nodes``: node
``i`` gets a random 64-bit node id and the node config ``partition-id = i``,
``num-partitions = N``) and keeps that mapping in the simulation runtime. This engine captures
the very mapping Flower builds the node configs from (:func:`_capture_node_partitions`) and hands
it to the ServerApp on its grid (:class:`SimulationGrid` ``.node_partitions``, as the local
engine's grid does), so ``FedSimStrategy.discover`` maps node ids to partitions without a single
``query.whoami`` and seeded sampling over partition ids maps onto node ids directly. Any
ClientApp — fedsim's or a vanilla Flower one that only answers ``train`` — can then serve as the
clients. The mapping is published in one step once all N nodes are registered; until then the
strategy sees no node and waits (``run.round_timeout``), so round 1 samples from all N partitions
exactly as the local engine does (DESIGN.md §4 determinism).

Message feed
------------
Flower's simulation runtime hands messages to its workers from a thread
(``vce_api.add_messages_to_queue``) that, every 0.1 s, asks the link state for one undelivered
message per registered node; each such ask scans every stored message and re-checks its expiry.
With 1000 nodes and the 50 messages of a round stored until their replies are pulled, that is
≈ 5·10⁴ checks per tick: the driver's busiest thread (≈ 60 % of its Python time in a 5-round
run), taking a core from the actors on a small machine. While this engine runs, the same thread
first looks once at the stored messages and asks the link state only for the nodes that have an
undelivered one (:func:`_feed_nodes_with_messages`), in Flower's node order, one message per node
and tick, through Flower's own ``get_message_ins`` (its expiry and federation checks unchanged).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fedsim.config import Scenario
from fedsim.errors import EngineError

_RUNTIME_LOCK = threading.Lock()  # one simulation at a time may patch Flower's runtime


class NodeBoard:
    """Where the simulation runtime publishes ``{node id: partition id}``: empty until all nodes are
    registered, then the complete mapping in one reference swap (a reader sees none of it or all)."""

    def __init__(self) -> None:
        self.mapping: dict[int, int] = {}

    def publish(self, mapping: dict[int, int]) -> None:
        self.mapping = dict(mapping)


class SimulationGrid:
    """The simulation's ``InMemoryGrid`` plus the node id → partition id mapping Flower assigned
    (:attr:`node_partitions`, read from a :class:`NodeBoard`); every Grid method is the wrapped grid's."""

    def __init__(self, grid: Any, board: NodeBoard) -> None:
        self._grid = grid
        self._board = board

    @property
    def node_partitions(self) -> dict[int, int]:
        """``{node id: partition id}`` exactly as the simulation's node configs say."""
        return self._board.mapping

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return self._grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:  # push_messages, pull_messages, run, get_nodes, ...
        return getattr(self._grid, name)


def _feed_nodes_with_messages(state: Any, queue: Any, nodes_mapping: dict[int, int], f_stop: threading.Event,
                              fallback: Any) -> None:
    """Flower's ``vce_api.add_messages_to_queue`` (every 0.1 s, at most one undelivered message per
    node, in ``nodes_mapping`` order, through ``state.get_message_ins``), asking only the nodes that
    have an undelivered message in ``state.message_ins_store``. A link state without that store (not
    Flower's in-memory one) gets ``fallback``, Flower's own loop."""
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return fallback(state, queue, nodes_mapping, f_stop)
    rank = {node_id: i for i, node_id in enumerate(nodes_mapping)}
    while not f_stop.is_set():
        with lock:
            waiting = {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}
        for node_id in sorted(waiting & rank.keys(), key=rank.__getitem__):
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(0.1)


def _vce_api() -> Any:
    """Flower's simulation runtime module (``flwr[simulation]``), or an :class:`EngineError` saying how to get it."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError as err:  # pragma: no cover - depends on the install
        raise EngineError("the Ray engine needs flwr[simulation]", "pip install 'flwr[simulation]'") from err
    return vce_api


@contextlib.contextmanager
def _capture_node_partitions(board: NodeBoard) -> Iterator[None]:
    """While active, every node registration of Flower's simulation runtime in this process
    publishes its ``{node id: partition id}`` mapping on ``board`` (Flower 1.39
    ``vce_api._register_nodes``, whose result each node's ``partition-id`` node config is made from)."""
    vce_api = _vce_api()
    original = getattr(vce_api, "_register_nodes", None)
    if original is None:  # pragma: no cover - a Flower version this engine was not written for
        raise EngineError("this Flower version does not register simulation nodes through "
                          "vce_api._register_nodes, so the Ray engine cannot learn which node holds which "
                          "partition without messaging every node",
                          "install the pinned flwr (pyproject.toml), or use --engine local")

    def register(num_nodes: int, state_factory: Any) -> dict[int, int]:
        mapping = original(num_nodes=num_nodes, state_factory=state_factory)
        board.publish(mapping)
        return mapping

    vce_api._register_nodes = register
    try:
        yield
    finally:
        vce_api._register_nodes = original


@contextlib.contextmanager
def _lean_message_feed() -> Iterator[None]:
    """While active, Flower's simulation runtime in this process feeds its workers with
    :func:`_feed_nodes_with_messages` instead of ``vce_api.add_messages_to_queue`` (kept as the
    fallback for a link state that is not Flower's in-memory one)."""
    vce_api = _vce_api()
    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None:  # pragma: no cover - a Flower version this engine was not written for
        yield
        return

    def feed(state: Any, queue: Any, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
        _feed_nodes_with_messages(state, queue, nodes_mapping, f_stop, fallback=original)

    vce_api.add_messages_to_queue = feed
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


def _on_simulation_grid(server_app: Any, board: NodeBoard) -> Any:
    """A ServerApp that runs ``server_app`` on a :class:`SimulationGrid` over Flower's grid."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        server_app(SimulationGrid(grid, board), context)

    return app


def backend_config_for(scenario: Scenario) -> dict[str, Any]:
    """Flower's ``backend_config`` for the scenario: ``[ray]`` resources per client, a Ray instance
    of ``min(cpus, max_workers · num_cpus)`` CPUs on loopback, quiet logs, and no idle worker
    prestarted for the driver (Ray's ``prestart_worker_first_driver``: Flower's actors never use it,
    and starting it costs ≈ 1.2 s of CPU and ≈ 1 s of ``ray.init`` on a 2-core machine)."""
    cpus = os.cpu_count() or 1
    r = scenario.ray
    init_args: dict[str, Any] = {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR,
                                 "log_to_driver": False, "_node_ip_address": "127.0.0.1",
                                 "_system_config": {"prestart_worker_first_driver": False}}
    if r.num_gpus > 0:
        init_args["num_gpus"] = 1
    if r.max_workers:
        init_args["num_cpus"] = min(cpus, r.max_workers * r.num_cpus)
    return {"client_resources": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}, "init_args": init_args}


def run_ray(scenario: Scenario, out_dir: str | Path, on_round=None, client_app=None) -> dict[str, Any]:
    """Run ``scenario`` on Flower's Simulation Engine (Ray), ``data.num_clients`` virtual SuperNodes.

    ``client_app``: any Flower ``ClientApp`` to serve as the clients (default: the scenario's
    ``run.client_app``, else fedsim's). A vanilla one reads its ``partition-id`` from
    ``context.node_config`` and answers ``train`` with ``arrays`` and ``metrics.num-examples``; a
    scenario asking fedsim's client side for something it would not do is refused before the run.
    """
    try:
        from flwr.simulation import run_simulation
    except ImportError as err:  # pragma: no cover - depends on the install
        raise EngineError("the Ray engine needs flwr[simulation]", "pip install 'flwr[simulation]'") from err
    from fedsim.catalog import resolve
    from fedsim.clients.client_app import build_client_app, check_foreign_app, describe_client_app, load_client_app
    from fedsim.server import build_server_app

    resolve(scenario)
    if client_app is None and scenario.run.client_app:
        client_app = load_client_app(scenario.run.client_app)
    served = describe_client_app(client_app, scenario)
    if client_app is not None:
        check_foreign_app(scenario, served)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    result: dict[str, Any] = {}
    if client_app is None:
        client_app = build_client_app(scenario)
    board = NodeBoard()
    server_app = _on_simulation_grid(
        build_server_app(scenario, out_dir, engine="ray", on_round=on_round, result=result, client_app=served),
        board)
    try:
        with _RUNTIME_LOCK, _capture_node_partitions(board), _lean_message_feed():
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=scenario.data.num_clients,
                           backend_config=backend_config_for(scenario))
    except KeyboardInterrupt as err:
        # the signal reaches this (main) thread only: the ServerApp thread stops before its next
        # round, and the summary says so now, whatever that thread still manages to write
        from fedsim.results import write_stopped_summary
        from fedsim.server import request_stop

        request_stop()
        write_stopped_summary(out_dir, "interrupted", str(err.args[0]) if err.args else "SIGINT",
                              rounds_planned=scenario.run.rounds, strategy=scenario.strategy.name,
                              seed=scenario.run.seed)
        raise
    if not result:
        raise EngineError("the Ray simulation ended without a result",
                          "look at the log above for the ServerApp's error; try --engine local to debug")
    return result
