"""DP-FTRL: client-level DP without sampling amplification, by tree aggregation.

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep) Learning without
Sampling or Shuffling", ICML 2021. Clients are visited in epochs: each epoch is a seeded
permutation of all clients cut into rounds of ``m`` clients, so every client contributes at most
once per epoch. The server keeps the running sum of the clipped client updates (each clipped to
``C``), releases it with binary-tree noise ``N(0, (zC)²)`` per tree node
(``fedsim.privacy.dp_ftrl.DPFTRLNoise``, with restarts and tree completion), and sets
``w_t = w_0 + server_lr · S̃_t / m``. Accounting is ρ-zCDP (``dp_ftrl_rho``) by the strategy's
:class:`~fedsim.privacy.mechanisms.DPFTRLMechanism`, which also holds the noise multiplier the tree
uses; with no noise and no clipping this is exactly FedAvg with uniform weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from fedsim.privacy.clipping import clip_flat
from fedsim.privacy.dp_ftrl import DPFTRLNoise
from fedsim.privacy.mechanisms import DPFTRLMechanism
from fedsim.rng import derive_seed, numpy_rng
from fedsim.strategies.base import (ClientUpdate, FedSimStrategy, ServerStepOptions, register_strategy,
                                    require_mechanism)


@register_strategy
class DPFTRL(FedSimStrategy):
    name = "dp_ftrl"
    tiny_overrides = ('privacy.mechanism="dp-ftrl"', "privacy.noise_multiplier=0.5",
                      "strategy.fraction_train=0.5")

    @dataclass(frozen=True)
    class Options(ServerStepOptions):
        efficient: bool = False  # Honaker's variance-reduced tree estimates

    def __init__(self, scenario, options=None) -> None:
        super().__init__(scenario, options)
        require_mechanism(scenario, self.name, "dp-ftrl")
        p = self.p = scenario.privacy
        self.m = max(self.min_train_clients, int(math.floor(self.fraction_train * self.num_partitions)))
        self.m = min(self.m, self.num_partitions)
        self.rounds_per_epoch = self.num_partitions // self.m
        self.mechanism = DPFTRLMechanism(p.noise_multiplier, self.rounds_per_epoch, p.ftrl_restart_every)
        self.mechanisms.append(self.mechanism)
        restart = p.ftrl_restart_every * self.rounds_per_epoch if p.ftrl_restart_every else None
        self.noise = DPFTRLNoise(self.mechanism.noise_multiplier, p.clip_norm, restart_every=restart, efficient=self.options.efficient,
                                 seed=None if p.secure_rng else derive_seed(scenario.run.seed, "dp-ftrl"))
        self.w0: list[np.ndarray] | None = None

    def sample(self, server_round, grid, fraction=None):
        if fraction is not None:
            return super().sample(server_round, grid, fraction)
        epoch, slot = divmod(server_round - 1, self.rounds_per_epoch)
        order = numpy_rng(self.seed, "ftrl-epoch", epoch).permutation(self.num_partitions)
        chosen = sorted(int(p) for p in order[slot * self.m:(slot + 1) * self.m])
        by_pid = self.available(grid, 1)
        return [(p, by_pid[p]) for p in chosen if p in by_pid]

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        idx = [i for i, g in enumerate(self.current) if g.dtype.kind == "f"]
        if self.w0 is None:
            self.w0 = [self.current[i].astype(np.float64) for i in idx]
            self.noise.init([self.current[i].shape for i in idx])
        total = [np.zeros(self.current[i].shape) for i in idx]
        for u in updates:
            clipped, _ = clip_flat([u.arrays[i].astype(np.float64) - self.current[i] for i in idx], self.p.clip_norm)
            for t, c in zip(total, clipped):
                t += c
        noisy_sum = self.noise.step(total)
        out = list(self.current)
        for j, i in enumerate(idx):
            out[i] = (self.w0[j] + self.options.server_lr * noisy_sum[j] / self.m).astype(self.current[i].dtype)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """The start point ``w_0`` and the noise tree (its drawn noise and position)."""
        if self.w0 is None:
            return {}
        state = {f"w0.{j}": w for j, w in enumerate(self.w0)}
        state["noise"] = np.frombuffer(json.dumps(_jsonable(self.noise.state_dict())).encode(), dtype=np.uint8)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        w0 = {int(k.split(".", 1)[1]): np.asarray(v, dtype=np.float64) for k, v in state.items()
              if k.startswith("w0.")}
        self.w0 = [w0[j] for j in sorted(w0)] if w0 else None
        if "noise" in state:
            self.noise.load_state_dict(json.loads(bytes(np.asarray(state["noise"], dtype=np.uint8)).decode()))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
