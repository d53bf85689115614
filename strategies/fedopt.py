"""Adaptive server optimisers: FedAdagrad, FedAdam, FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
Optimization", ICLR 2021 (Algorithm 2). The pseudo-gradient is the example-weighted mean client
update; the server applies Adagrad/Adam/Yogi with step ``eta`` and adaptivity ``tau``.
Moments are strategy state (``state_dict``) so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.strategies.fedavg_math import fedopt_step, weighted_mean
from fedsim.strategies.base import ClientUpdate, FedSimStrategy, register_strategy


@dataclass(frozen=True)
class FedOptOptions:
    eta: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.eta <= 0 or self.tau <= 0:
            raise ValueError("eta and tau must be > 0")
        if not (0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1):
            raise ValueError("beta_1 and beta_2 must lie in [0, 1)")


class _FedOpt(FedSimStrategy):
    kind = "adam"
    Options = FedOptOptions

    def __init__(self, scenario, options=None) -> None:
        super().__init__(scenario, options)
        self.m: list[np.ndarray] | None = None
        self.v: list[np.ndarray] | None = None

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        mean = weighted_mean([u.arrays for u in updates], [u.num_examples for u in updates])
        float_idx = [i for i, g in enumerate(self.current) if g.dtype.kind == "f"]
        params = [self.current[i] for i in float_idx]
        delta = [mean[i].astype(np.float64) - self.current[i] for i in float_idx]
        o = self.options
        new, self.m, self.v = fedopt_step(params, delta, self.m, self.v, kind=self.kind,
                                          eta=o.eta, beta_1=o.beta_1, beta_2=o.beta_2, tau=o.tau)
        out = list(mean)  # integer buffers: plain average
        for i, p in zip(float_idx, new):
            out[i] = p
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.m is None or self.v is None:
            return {}
        d = {f"m.{i}": a for i, a in enumerate(self.m)}
        d.update({f"v.{i}": a for i, a in enumerate(self.v)})
        return d

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        n = sum(1 for k in state if k.startswith("m."))
        if n:
            self.m = [np.asarray(state[f"m.{i}"]) for i in range(n)]
            self.v = [np.asarray(state[f"v.{i}"]) for i in range(n)]


@register_strategy
class FedAdam(_FedOpt):
    name = "fedadam"
    kind = "adam"


@register_strategy
class FedYogi(_FedOpt):
    name = "fedyogi"
    kind = "yogi"


@register_strategy
class FedAdagrad(_FedOpt):
    name = "fedadagrad"
    kind = "adagrad"
