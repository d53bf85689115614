"""FedLD: principal-gradient aggregation with client-side margin control.

Zeng, Guo, Wang, Wang, Zhou, Qu. "Tackling Data Heterogeneity in Federated Learning via Loss
Decomposition", MICCAI 2024 (arXiv 2408.12300); reference code Zeng-Shuang/FedLD.

Server: per state-dict key (BatchNorm buffers included) the clients' updates are projected on the
top ``floor(m·kappa)`` eigen-directions of their Gram matrix, sign-aligned by majority and rescaled
to preserve each client's norm (``fedsim.strategies.fedld_math``); the first time a key is
seen, and for scalar buffers, the plain unweighted mean is used. The result does not depend on
``num-examples``. Client: cross-entropy plus ``lam·log(1+||softmax||²)`` (the ``fedld_margin``
plugin, enabled automatically; the server sends ``fedld-lambda`` each round).

Not in the paper (issue 12): every round reports the regime in ``metrics.jsonl``:
``fedld-alignment`` (median pairwise cosine of the client updates), ``fedld-step-cosine`` and
``fedld-step-ratio`` (the applied step against the plain mean) and ``fedld-weight`` (the weight of
FedLD's own aggregate). ``guard = "alignment"`` mixes FedLD's aggregate with the plain mean when
the updates are not aligned (``fedld-weight = clip(alignment / min_alignment, 0, 1)``); the default
``guard = "none"`` is the paper's aggregation bit for bit. Which to use when: ``strategies/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.strategies.base import ClientUpdate, FedSimStrategy, register_strategy
from fedsim.strategies.fedld_math import GUARDS, FedLDAggregator


@register_strategy
class FedLD(FedSimStrategy):
    name = "fedld"
    client_plugins = ("fedld_margin",)

    @dataclass(frozen=True)
    class Options:
        kappa: float = 0.8
        lam: float = 0.03
        guard: str = "none"           # none (the paper) | alignment (mix toward the mean when misaligned)
        min_alignment: float = 0.5    # alignment at and above which FedLD's own aggregate is used in full

        def __post_init__(self) -> None:
            if not 0 < self.kappa <= 1:
                raise ValueError(f"kappa must lie in (0, 1], got {self.kappa}")
            if self.lam < 0:
                raise ValueError(f"lam must be >= 0, got {self.lam}")
            if self.guard not in GUARDS:
                raise ValueError(f"guard must be one of {', '.join(GUARDS)}, got {self.guard!r}")
            if not 0 < self.min_alignment <= 1:
                raise ValueError(f"min_alignment must lie in (0, 1], got {self.min_alignment}")

    def __init__(self, scenario, options=None) -> None:
        super().__init__(scenario, options)
        o = self.options
        self.aggregator = FedLDAggregator(kappa=o.kappa, guard=o.guard, min_alignment=o.min_alignment)

    def train_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        return {"fedld-lambda": float(self.options.lam)}

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        glob = dict(zip(self.keys, self.current))
        new = self.aggregator.aggregate(glob, [dict(zip(self.keys, u.arrays)) for u in updates])
        return [new[k] for k in self.keys]

    def train_metrics(self, updates: list[ClientUpdate]) -> dict[str, float | int]:
        out = super().train_metrics(updates)
        out.update({f"fedld-{k}": float(v) for k, v in self.aggregator.diagnostics.items()})
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"seen": np.array([self.aggregator.seen.get(k, False) for k in self.keys], dtype=bool),
                "keys": np.array(self.keys)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "seen" in state:
            self.aggregator.seen = {str(k): bool(v) for k, v in zip(state["keys"], state["seen"])}
