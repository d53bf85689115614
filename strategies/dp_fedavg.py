"""DP-FedAvg: client-level differential privacy on the server.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018; adaptive clipping from Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021.

Each client update ``Δ_i = w_i − w`` (float tensors, buffers included) is clipped to ``C`` (flat, or
per layer with bounds summing in quadrature to C), the clipped updates are averaged with uniform
weights over a **fixed denominator** (the expected number of sampled clients, so dropouts do not
shrink the noise relative to the sensitivity), and ``N(0, (zC/m)²)`` is added. Clients are sampled
by Poisson sampling with rate ``fraction_train`` or as a fixed-size sample without replacement; the
strategy's :class:`~fedsim.privacy.mechanisms.ClientLevelMechanism` holds the noise multiplier, the
rate and the sample size, and its accounting event (Poisson-subsampled Gaussian, or replace-one
neighbours for fixed size) is what the ledger composes. Settings come from ``[privacy]``:
``noise_multiplier``, ``clip_norm``, ``clipping``, ``client_sampling``, ``adaptive_clipping``,
``target_quantile``, ``clip_lr``, ``count_noise``.
"""

from __future__ import annotations

import numpy as np

from fedsim.privacy.clipping import (adaptive_noise_multiplier, dp_fedavg_aggregate, gaussian_noise_for_sum,
                                     per_layer_bounds, update_clip_norm)
from fedsim.privacy.mechanisms import ClientLevelMechanism
from fedsim.rng import numpy_rng
from fedsim.strategies.base import (ClientUpdate, FedSimStrategy, ServerStepOptions, register_strategy,
                                    require_mechanism)


def noise_rng(scenario, purpose: str, server_round: int) -> np.random.Generator:
    """Seeded per (round, mechanism) for reproducible simulation; OS entropy in secure mode."""
    if scenario.privacy.secure_rng:
        return np.random.default_rng()
    return numpy_rng(scenario.run.seed, "noise", purpose, server_round)


@register_strategy
class DPFedAvg(FedSimStrategy):
    name = "dp_fedavg"
    tiny_overrides = ('privacy.mechanism="dp-fedavg"', "privacy.noise_multiplier=0.5",
                      "strategy.fraction_train=0.5")

    Options = ServerStepOptions

    def __init__(self, scenario, options=None) -> None:
        super().__init__(scenario, options)
        require_mechanism(scenario, self.name, "dp-fedavg")
        p = self.p = scenario.privacy
        self.mechanism = ClientLevelMechanism(p.noise_multiplier, p.client_sampling, self.fraction_train,
                                              super().sample_size(), self.num_partitions, p.accountant)
        self.mechanisms.append(self.mechanism)
        self.clip_norm = p.clip_norm
        self.expected_m = max(1, round(self.mechanism.rate * self.num_partitions)) \
            if self.mechanism.sampling == "poisson" else None
        self.last_round: dict[str, float] = {}
        if p.adaptive_clipping and p.noise_multiplier > 0:  # refuse before the run, not inside round 1
            m = self.expected_m if self.expected_m is not None else self.mechanism.sample_size
            adaptive_noise_multiplier(p.noise_multiplier, p.count_noise or m / 20.0)

    def sample_size(self, fraction=None) -> int:
        return self.mechanism.sample_size if fraction is None else super().sample_size(fraction)

    def sample(self, server_round, grid, fraction=None):
        if self.mechanism.sampling != "poisson" or fraction is not None:
            return super().sample(server_round, grid, fraction)
        by_pid = self.available(grid, 1)
        keep = self.mechanism.poisson_sample(numpy_rng(self.seed, "poisson-sample", server_round))
        return [(p, by_pid[p]) for p in range(self.num_partitions) if keep[p] and p in by_pid]

    def denominator(self) -> int:
        return self.expected_m if self.expected_m is not None else max(len(self.sampled), 1)

    def min_replies(self) -> int:
        # an empty Poisson sample still releases noise (and is accounted)
        return super().min_replies() if self.sampled else 0

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        idx = [i for i, g in enumerate(self.current) if g.dtype.kind == "f"]
        deltas = [[u.arrays[i].astype(np.float64) - self.current[i] for i in idx] for u in updates]
        shapes = [self.current[i].shape for i in idx]
        m = self.denominator()
        z = self.mechanism.noise_multiplier
        sigma_b = self.p.count_noise or m / 20.0
        if self.p.adaptive_clipping:
            z = adaptive_noise_multiplier(z, sigma_b) if z > 0 else 0.0
        bounds = per_layer_bounds(self.clip_norm, shapes) if self.p.clipping == "per_layer" else None
        rng = noise_rng(self.scenario, "dp-fedavg", server_round)
        if deltas:
            agg = dp_fedavg_aggregate(deltas, self.clip_norm, z, rng, denominator=max(m, len(deltas)),
                                      layer_bounds=bounds)
            mean, norms = agg.update, agg.norms
        else:
            mean = [n / m for n in gaussian_noise_for_sum(shapes, z * self.clip_norm, rng)]
            norms = []
        self.last_round = {"clip_norm": self.clip_norm, "noise_std": z * self.clip_norm / m,
                           "median_update_norm": float(np.median(norms)) if norms else 0.0}
        if self.p.adaptive_clipping:
            unclipped = sum(1 for n in norms if n <= self.clip_norm)
            self.clip_norm = update_clip_norm(self.clip_norm, unclipped, m, self.p.target_quantile,
                                              self.p.clip_lr, sigma_b, noise_rng(self.scenario, "clip-count",
                                                                                 server_round))
        out = list(self.current)
        for i, d in zip(idx, mean):
            out[i] = (self.current[i] + self.options.server_lr * d).astype(self.current[i].dtype)
        return out

    def train_metrics(self, updates):
        if not self.sampled:
            return {}  # nothing was sampled: the round released noise only
        out = super().train_metrics(updates)
        out.update({f"dp/{k}": v for k, v in self.last_round.items()})
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"clip_norm": np.asarray(self.clip_norm)}

    def load_state_dict(self, state) -> None:
        if "clip_norm" in state:
            self.clip_norm = float(state["clip_norm"])
