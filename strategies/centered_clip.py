"""Centered clipping (``centered_clip``), optionally after bucketing: a Byzantine-robust aggregator.

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021
(centered clipping around the previous aggregate, "learning from history"); Karimireddy, He,
Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing", ICLR 2022 (bucketing).

The clients' updates ``Δ_i = w_i − w`` (floating-point tensors, flattened into one vector each) are
optionally averaged in seeded random buckets of ``bucket_size``, then clipped ``iterations`` times
around the centre ``v``, which starts from the previous round's aggregate update (zero in round 1)
— the server-side momentum the paper's "history" refers to. The new model is ``w + v``; integer
buffers are averaged. Unweighted: every client (bucket) counts once, as in the papers; a client
with many examples cannot buy influence. The previous aggregate is strategy state (``state_dict``),
so a resumed run continues exactly. Math: :mod:`fedsim.strategies.centered_clip_math`.

Options
-------
tau           clipping radius ``τ`` in parameter space (default 1.0; measured on the digits MLP, the
              honest updates of the default scenario lie at distance ~0.3–1.5 from their mean)
iterations    clipping iterations ``L`` (the paper's experiments use 1)
bucket_size   ``s``: 1 = no bucketing
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsim.rng import numpy_rng
from fedsim.strategies.base import ClientUpdate, FedSimStrategy, register_strategy
from fedsim.strategies.centered_clip_math import bucket_means, centered_clip
from fedsim.strategies.fedavg_math import weighted_mean


@register_strategy
class CenteredClip(FedSimStrategy):
    name = "centered_clip"

    @dataclass(frozen=True)
    class Options:
        tau: float = 1.0
        iterations: int = 1
        bucket_size: int = 1

        def __post_init__(self) -> None:
            if not (self.tau > 0 and math.isfinite(self.tau)):
                raise ValueError(f"tau must be a finite number > 0, got {self.tau}")
            if self.iterations < 1:
                raise ValueError(f"iterations must be >= 1, got {self.iterations}")
            if self.bucket_size < 1:
                raise ValueError(f"bucket_size must be >= 1 (1 = no bucketing), got {self.bucket_size}")

    def __init__(self, scenario, options=None) -> None:
        super().__init__(scenario, options)
        self.v: np.ndarray | None = None  # the previous round's aggregate update (flattened floats)
        self.round_info: dict[str, float] = {}

    def _floats(self) -> list[int]:
        return [i for i, g in enumerate(self.current) if np.issubdtype(g.dtype, np.floating)]

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        floats = self._floats()
        rows = np.stack([np.concatenate([(np.asarray(u.arrays[i], np.float64) - self.current[i]).ravel()
                                         for i in floats]) for u in updates])
        s = self.options.bucket_size
        if s > 1:
            perm = numpy_rng(self.seed, "bucketing", server_round).permutation(len(rows))
            rows = bucket_means(rows, s, perm)
        v0 = self.v if self.v is not None and self.v.shape == rows.shape[1:] else np.zeros(rows.shape[1])
        v, clipped = centered_clip(rows, v0, self.options.tau, self.options.iterations)
        self.v = v
        self.round_info = {"cc-clipped-fraction": clipped, "cc-update-norm": float(np.linalg.norm(v))}
        out = weighted_mean([u.arrays for u in updates], [1.0] * len(updates))  # integer buffers
        at = 0
        for i in floats:
            g = self.current[i]
            out[i] = (g.astype(np.float64) + v[at:at + g.size].reshape(g.shape)).astype(g.dtype)
            at += g.size
        return out

    def train_metrics(self, updates: list[ClientUpdate]) -> dict[str, float | int]:
        out = super().train_metrics(updates)
        out.update(self.round_info)
        self.round_info = {}
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self.v is None else {"v": self.v}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "v" in state:
            self.v = np.asarray(state["v"], dtype=np.float64)
