"""FedAvg: example-weighted average of client models.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017. With ``server_lr != 1`` the global model moves by
``server_lr`` times the weighted mean update (FedAvg with a server step size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.strategies.fedavg_math import weighted_mean
from fedsim.strategies.base import ClientUpdate, FedSimStrategy, ServerStepOptions, register_strategy


@register_strategy
class FedAvg(FedSimStrategy):
    name = "fedavg"

    @dataclass(frozen=True)
    class Options(ServerStepOptions):
        weighted: bool = True

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        weights = [u.num_examples if self.options.weighted else 1.0 for u in updates]
        mean = weighted_mean([u.arrays for u in updates], weights)
        if self.options.server_lr == 1.0:
            return mean
        return [g + self.options.server_lr * (m - g) if g.dtype.kind == "f" else m
                for g, m in zip(self.current, mean)]
