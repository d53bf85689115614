"""Where the server learns which node holds which partition without asking the nodes.

``FedSimStrategy.discover`` reads a grid's ``node_partitions`` (``{node id: partition id}``) when the
grid has one, else it asks each new node once (``query.whoami``). Grids with that mapping:

* the local engine's and the Ray engine's (:mod:`fedsim.engines.local`, :mod:`fedsim.engines.ray`);
* :class:`KnownNodesGrid`: a deployment whose node ids were known before the run. ``fedsim deploy``
  with node authentication registers one key per SuperNode before starting it, so it knows
  ``{node id: (partition-id, num-partitions)}`` exactly as each node's ``--node-config`` says, and
  passes it to the ServerApp in the run config (``node-partitions``, :func:`format_node_partitions`);
* Flower's own simulation under ``flwr run`` (:mod:`fedsim.flower_app`).

A grid may also say what each node's ``num-partitions`` is (``node_num_partitions``; default: the
scenario's ``data.num_clients``) and that its mapping is complete (``node_partitions_complete``: a
node it does not list is refused as ``unlisted-node`` instead of being waited for).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from fedsim.errors import ConfigError

#: the run-config key of a deployment's node directory
NODE_PARTITIONS_KEY = "node-partitions"
_ITEM = re.compile(r"^(\d{1,20}):(\d{1,9})/(\d{1,9})$")
_HOW = ("give NODE_ID:PARTITION_ID/NUM_PARTITIONS items separated by commas, one per SuperNode, e.g. "
        "node-partitions=\"8312...:0/2,1907...:1/2\" (python -m fedsim.engines.deploy app --node-partitions)")


def format_node_partitions(claims: Mapping[int, tuple[int, int]]) -> str:
    """``{node id: (partition id, num-partitions)}`` as the run-config text :func:`parse_node_partitions` reads:
    ``"NODE:PID/N,NODE:PID/N"``, ordered by partition then node id."""
    items = sorted(claims.items(), key=lambda kv: (kv[1][0], kv[0]))
    return ",".join(f"{int(node)}:{int(pid)}/{int(total)}" for node, (pid, total) in items)


def parse_node_partitions(text: Any) -> dict[int, tuple[int, int]]:
    """The run config's ``node-partitions`` as ``{node id: (partition id, num-partitions)}``; anything
    malformed (not a string, a bad item, a node id listed twice or outside 1..2⁶⁴-1, a partition id not
    below its ``num-partitions`` when that is not 0) is a :class:`ConfigError` naming ``run-config.node-partitions``."""
    key = f"run-config.{NODE_PARTITIONS_KEY}"
    if not isinstance(text, str):
        raise ConfigError(key, f"must be a string (got {text!r})", _HOW)
    out: dict[int, tuple[int, int]] = {}
    for item in (part.strip() for part in text.split(",")):
        m = _ITEM.match(item)
        if m is None:
            raise ConfigError(key, f"item {item[:60]!r} is not NODE_ID:PARTITION_ID/NUM_PARTITIONS", _HOW)
        node, pid, total = (int(g) for g in m.groups())
        if not 0 < node < 2**64:
            raise ConfigError(key, f"node id {node} is outside Flower's 1..2^64-1", _HOW)
        if node in out:
            raise ConfigError(key, f"node {node} is listed twice", "list each SuperNode once")
        if total and pid >= total:  # 0: the node config says no num-partitions (as a whoami answer may)
            raise ConfigError(key, f"node {node}: partition-id {pid} is not below its num-partitions {total}", _HOW)
        out[node] = (pid, total)
    return out


class KnownNodesGrid:
    """A grid plus a complete, given ``{node id: (partition id, num-partitions)}`` (a deployment's
    run-config ``node-partitions``); every other attribute is the wrapped grid's."""

    node_partitions_complete = True

    def __init__(self, grid: Any, claims: Mapping[int, tuple[int, int]]) -> None:
        self._grid = grid
        self.node_partitions = {n: pid for n, (pid, _) in claims.items()}
        self.node_num_partitions = {n: total for n, (_, total) in claims.items()}

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return self._grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:  # push_messages, pull_messages, run, get_nodes, ...
        return getattr(self._grid, name)


def grid_claims(grid: Any, order: list[int], num_partitions: int
                ) -> tuple[dict[int, tuple[Any, Any]], list[int]] | None:
    """``(claims, unlisted)`` for the new nodes ``order`` from the grid's own mapping, or ``None`` when
    the grid has none (the server must ask). ``claims``: ``{node: (partition id, num-partitions)}`` as the
    node configs say; ``unlisted``: nodes a complete mapping does not list (refused). A node an incomplete
    mapping does not list yet is in neither (left for a later call)."""
    known = getattr(grid, "node_partitions", None)
    if known is None:
        return None
    totals = getattr(grid, "node_num_partitions", None) or {}
    claims = {n: (known[n], totals.get(n, num_partitions)) for n in order if n in known}
    unlisted = [n for n in order if n not in known] if getattr(grid, "node_partitions_complete", False) else []
    return claims, unlisted
