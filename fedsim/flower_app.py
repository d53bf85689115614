"""The Flower app objects that ``flwr run`` loads (deployment and ``flwr run`` simulation).

Both read the scenario from the run config: ``scenario`` holds the resolved scenario as TOML
text, ``out-dir`` the run directory the ServerApp writes (on the SuperLink's machine). Each
process that imports this module (``flwr-serverapp``, one ``flwr-clientapp`` per message)
rebuilds the scenario from that text, so the same two objects run unchanged on every engine.
A scenario naming another ClientApp (``run.client_app``) gets every message passed to it by
``client_app`` (:class:`fedsim.clients.client_app.DelegatingClientApp`).

Node directory without messages
-------------------------------
``server_app`` hands the fedsim ServerApp a grid that knows which node holds which partition
wherever that can be known exactly (:func:`node_directory_grid`), so no ``query.whoami`` is sent
and any ClientApp, also a vanilla one that answers only ``train``, can serve:

* a deployment whose run config has ``node-partitions`` (``fedsim deploy`` with node
  authentication registers each SuperNode's key, hence its node id, before the node starts):
  :class:`~fedsim.strategies.node_directory.KnownNodesGrid`, complete, so an unlisted node is refused;
* Flower's simulation (``flwr run`` on a ``":local:"`` federation, or ``run_simulation``), whose
  ServerApp gets an ``InMemoryGrid`` over an ``InMemoryLinkState``: :class:`SimulationRuntimeGrid`.
  In Flower 1.39 ``flwr/simulation/run_simulation.py::_main_loop`` starts the ServerApp thread, then
  ``vce_api.start_vce`` registers the nodes (``_register_nodes``: node ``i`` gets a random node id
  and ``partition-id = i``, ``num-partitions = N``), builds the Ray backend, and only then starts
  its message thread ``add_messages_to_queue(state, queue, nodes_mapping, f_stop)``, whose
  ``nodes_mapping`` is the very ``{node id: partition id}`` the node configs were made from. The
  grid finds that thread by its target and by the ``state`` it serves (``is`` the grid's own, so
  two simulations in one process never mix) and takes its mapping; until it exists the grid shows
  no node (the server waits, ``run.round_timeout``), and then every node at once, so round 1
  samples from all N partitions as on the other engines. ``num-partitions`` is Flower's too
  (``len(set(mapping.values()))``), so Flower's default 2-node federation is still refused for a
  larger scenario. This reads the attributes ``Thread._target`` / ``_args`` that CPython keeps
  while the thread runs; had the thread no such mapping, no node would ever show and the run
  would end with a QuorumError naming the timeout, never with a guessed mapping;
* any other grid (a SuperLink you run, insecure ``fedsim deploy``) is left as it is: the strategy
  asks each new node once (``query.whoami``), which fedsim's ClientApp answers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.serverapp import ServerApp

from fedsim.catalog import registries
from fedsim.clients.client_app import build_client_app
from fedsim.config import Scenario
from fedsim.errors import ConfigError, FedSimError
from fedsim.server import build_server_app
from fedsim.strategies.node_directory import NODE_PARTITIONS_KEY, KnownNodesGrid, parse_node_partitions

_LOG = logging.getLogger("flwr")


class SimulationRuntimeGrid:
    """Flower's in-memory simulation grid plus the simulation runtime's own ``{node id: partition id}``
    (see the module docstring); a node shows only once that mapping is found. Every other attribute is
    the wrapped grid's."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self._mapping: dict[int, int] = {}

    def _runtime_mapping(self) -> dict[int, int]:
        if not self._mapping:
            self._mapping = runtime_node_partitions(self._grid.state) or {}
        return self._mapping

    @property
    def node_partitions(self) -> dict[int, int]:
        return self._runtime_mapping()

    @property
    def node_num_partitions(self) -> dict[int, int]:
        mapping = self._runtime_mapping()
        total = len(set(mapping.values()))  # what Flower writes into every node config
        return dict.fromkeys(mapping, total)

    def get_node_ids(self) -> Iterable[int]:
        mapping = self._runtime_mapping()
        return [n for n in self._grid.get_node_ids() if n in mapping] if mapping else []

    def get_nodes(self) -> Iterable[Any]:
        mapping = self._runtime_mapping()
        return [info for info in self._grid.get_nodes() if info.node_id in mapping]

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return self._grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:  # push_messages, pull_messages, run, ...
        return getattr(self._grid, name)


def runtime_node_partitions(state: Any) -> dict[int, int] | None:
    """The ``{node id: partition id}`` of the Flower simulation runtime serving ``state`` (its message
    thread's ``nodes_mapping``, see the module docstring), or ``None`` while that thread is not running."""
    from flwr.server.superlink.fleet.vce import vce_api

    for thread in threading.enumerate():
        if getattr(thread, "_target", None) is not vce_api.add_messages_to_queue:
            continue
        args = getattr(thread, "_args", ())
        if len(args) >= 3 and args[0] is state and isinstance(args[2], dict):
            return {int(node): int(pid) for node, pid in args[2].items()}
    return None


def is_simulation_grid(grid: Any) -> bool:
    """Whether ``grid`` is Flower's in-memory simulation grid (an ``InMemoryGrid`` over an ``InMemoryLinkState``)."""
    from flwr.server.superlink.linkstate import InMemoryLinkState
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid) and isinstance(getattr(grid, "state", None), InMemoryLinkState)


def node_directory_grid(grid: Any, run_config: Mapping[str, Any]) -> Any:
    """``grid`` with the node directory that can be known exactly (see the module docstring), or ``grid``
    itself (the strategy then asks the nodes). A ``node-partitions`` run-config value on a grid that has
    its own mapping is a :class:`ConfigError`: node ids there are the engine's, not the operator's."""
    given = run_config.get(NODE_PARTITIONS_KEY, "")
    own = getattr(grid, "node_partitions", None) is not None or is_simulation_grid(grid)
    if given != "" and own:
        raise ConfigError(f"run-config.{NODE_PARTITIONS_KEY}", "is for deployments; this grid (a simulation or "
                          "fedsim's own engine) already knows each node's partition", "remove it from the run config")
    if getattr(grid, "node_partitions", None) is not None:
        return grid  # the local and Ray engines' grids
    if is_simulation_grid(grid):
        return SimulationRuntimeGrid(grid)
    if given != "":
        return KnownNodesGrid(grid, parse_node_partitions(given))
    return grid


def check_client_app(scenario: Scenario) -> None:
    """A ClientApp the scenario names must load and suit it (``run.client_app``), before round 1."""
    if scenario.run.client_app:
        from fedsim.clients.client_app import check_foreign_app, load_client_app

        load_client_app(scenario.run.client_app)
        check_foreign_app(scenario, f"'{scenario.run.client_app}'")


def with_node_directory(inner: ServerApp, scenario: Scenario | None = None) -> ServerApp:
    """A ServerApp that runs ``inner`` on :func:`node_directory_grid`'s grid, after checking the
    scenario's ``run.client_app`` (``scenario`` or, when ``None``, the run config's)."""
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        from fedsim.app_config import scenario_from_run_config

        try:
            check_client_app(scenario if scenario is not None else scenario_from_run_config(context.run_config))
            wrapped = node_directory_grid(grid, context.run_config)
        except FedSimError as err:
            _LOG.error("fedsim: %s: %s", type(err).__name__, err)
            raise
        inner(wrapped, context)

    return app


# Fill every registry (strategies' client tasks ``train.<task>`` included) before the ClientApp is
# built; the ServerApp resolves the scenario it reads from the run config.
registries()

server_app = with_node_directory(build_server_app())
client_app = build_client_app()

__all__ = ["server_app", "client_app"]
