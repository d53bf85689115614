"""FedProx: FedAvg aggregation; clients add the proximal term ``(mu/2)||w - w_g||²``.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020. The server sends
``proximal-mu`` in every train config (as Flower's FedProx does); the client side is the
``fedprox`` plugin, which the ClientApp enables automatically for this strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedsim.strategies.base import register_strategy
from fedsim.strategies.fedavg import FedAvg


@register_strategy
class FedProx(FedAvg):
    name = "fedprox"
    client_plugins = ("fedprox",)

    @dataclass(frozen=True)
    class Options(FedAvg.Options):
        mu: float = 0.01

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.mu < 0:
                raise ValueError(f"mu must be >= 0, got {self.mu}")

    def train_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        return {"proximal-mu": float(self.options.mu)}
