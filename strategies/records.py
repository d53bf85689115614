"""The records the strategy template and every strategy share: a validated update, a failure, and
the small option types and checks several strategies use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedsim.config import Scenario
from fedsim.errors import ConfigError


@dataclass
class ClientUpdate:
    """One validated client reply."""

    partition_id: int
    node_id: int
    arrays: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    content: RecordDict


@dataclass
class FailureRecord:
    round: int
    partition_id: int | None
    node_id: int
    kind: str  # client: error | timeout | invalid | sat-out | straggler; round: quorum | aggregation
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "client": self.partition_id, "node_id": self.node_id,
                "status": self.kind, "reason": self.reason}


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class ServerStepOptions:
    """Options of strategies that apply the aggregate with a server step size."""

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")


def require_mechanism(scenario: Scenario, strategy: str, mechanism: str) -> None:
    """A private strategy needs the matching ``[privacy] mechanism`` (its noise and accounting)."""
    if scenario.privacy.mechanism != mechanism:
        raise ConfigError("privacy.mechanism", f"strategy {strategy} needs privacy.mechanism = \"{mechanism}\"",
                          f"set [privacy] mechanism = \"{mechanism}\" with a noise_multiplier")


def weighted_metrics(ms: list[dict[str, Any]]) -> dict[str, float]:
    """Example-weighted mean of numeric client metrics (ids, counts and the clients' own DP-SGD
    figures excluded: ε per client is the ledger's, reported per client and as the worst client)."""
    skip = {"partition-id", "num-examples", "label-counts"}
    weights = [float(m.get("num-examples", 1)) for m in ms]
    total = sum(weights) or 1.0
    out: dict[str, float] = {}
    for key in sorted({k for m in ms for k in m if not k.startswith("dp_sgd/")} - skip):
        vals = [(w, m[key]) for w, m in zip(weights, ms) if isinstance(m.get(key), (int, float))]
        if vals:
            out[key] = float(sum(w * v for w, v in vals) / (sum(w for w, _ in vals) or total))
    return out
