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

_CAPTURE_LOCK = threading.Lock()


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


@contextlib.contextmanager
def _capture_node_partitions(board: NodeBoard) -> Iterator[None]:
    """While active, every node registration of Flower's simulation runtime in this process
    publishes its ``{node id: partition id}`` mapping on ``board`` (Flower 1.39
    ``vce_api._register_nodes``, whose result each node's ``partition-id`` node config is made from)."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError as err:  # pragma: no cover - depends on the install
        raise EngineError("the Ray engine needs flwr[simulation]", "pip install 'flwr[simulation]'") from err
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

    with _CAPTURE_LOCK:  # one simulation at a time may patch the runtime
        vce_api._register_nodes = register
        try:
            yield
        finally:
            vce_api._register_nodes = original


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
    of ``min(cpus, max_workers · num_cpus)`` CPUs on loopback, quiet logs."""
    cpus = os.cpu_count() or 1
    r = scenario.ray
    init_args: dict[str, Any] = {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR,
                                 "log_to_driver": False, "_node_ip_address": "127.0.0.1"}
    if r.num_gpus > 0:
        init_args["num_gpus"] = 1
    if r.max_workers:
        init_args["num_cpus"] = min(cpus, r.max_workers * r.num_cpus)
    return {"client_resources": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}, "init_args": init_args}


def run_ray(scenario: Scenario, out_dir: str | Path, on_round=None, client_app=None) -> dict[str, Any]:
    """Run ``scenario`` on Flower's Simulation Engine (Ray), ``data.num_clients`` virtual SuperNodes.

    ``client_app``: any Flower ``ClientApp`` to serve as the clients (default: fedsim's). A vanilla
    one reads its ``partition-id`` from ``context.node_config`` and answers ``train`` with
    ``arrays`` and ``metrics.num-examples``.
    """
    try:
        from flwr.simulation import run_simulation
    except ImportError as err:  # pragma: no cover - depends on the install
        raise EngineError("the Ray engine needs flwr[simulation]", "pip install 'flwr[simulation]'") from err
    from fedsim.catalog import resolve
    from fedsim.clients.client_app import build_client_app
    from fedsim.server import build_server_app

    resolve(scenario)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    result: dict[str, Any] = {}
    if client_app is None:
        client_app = build_client_app(scenario)
    board = NodeBoard()
    server_app = _on_simulation_grid(
        build_server_app(scenario, out_dir, engine="ray", on_round=on_round, result=result), board)
    try:
        with _capture_node_partitions(board):
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
