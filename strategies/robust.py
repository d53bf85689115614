"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, (Multi-)Krum.

* FedMedian — Yin, Chen, Ramchandran, Bartlett, ICML 2018 (tolerates f < m/2).
* Trimmed mean — same paper; drops ``floor(beta·m)`` extremes per coordinate.
* Krum / Multi-Krum — Blanchard et al., NeurIPS 2017 (needs m > 2f + 2).

Updates are validated before they get here (NaN/Inf, shapes), so a NaN client cannot poison a
coordinate as it does with a bare ``np.median``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.errors import AggregationError, ConfigError
from fedsim.strategies.fedavg_math import coordinate_median, multi_krum, trimmed_mean, trimmed_per_side
from fedsim.strategies.base import ClientUpdate, FedSimStrategy, register_strategy


@register_strategy
class FedMedian(FedSimStrategy):
    name = "fedmedian"

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        return coordinate_median([u.arrays for u in updates])


@register_strategy
class TrimmedMean(FedSimStrategy):
    name = "trimmed_mean"

    @dataclass(frozen=True)
    class Options:
        beta: float = 0.1

        def __post_init__(self) -> None:
            if not 0 <= self.beta < 0.5:
                raise ValueError(f"beta must lie in [0, 0.5), got {self.beta}")

    tiny_overrides = ("strategy.beta=0.2",)  # the tests' 6-client rounds: floor(0.1 · 6) would trim nothing

    def __init__(self, scenario: Any, options: Any | None = None) -> None:
        super().__init__(scenario, options)
        m, beta = self.sample_size(), self.options.beta
        if beta > 0 and trimmed_per_side(beta, m) == 0:  # the defence asked for would be the plain mean
            raise ConfigError("strategy.beta",
                              f"the trimmed mean drops floor(beta · m) = floor({beta:g} · {m}) = 0 values per side "
                              f"of each coordinate: with {m} clients a round it would be the plain, undefended mean",
                              f"set strategy.beta >= {1 / m:.3g} (1/m) or sample more clients a round "
                              "(beta = 0 asks for the plain mean explicitly)")

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        return trimmed_mean([u.arrays for u in updates], self.options.beta)

    def train_metrics(self, updates: list[ClientUpdate]) -> dict[str, float | int]:
        """The base metrics and ``trimmed-per-side``: the values dropped at each end of every coordinate this
        round (fewer valid replies can make it 0: that round's mean was not trimmed)."""
        trimmed = trimmed_per_side(self.options.beta, len(updates))
        return {**super().train_metrics(updates), "trimmed-per-side": trimmed}


@register_strategy
class Krum(FedSimStrategy):
    name = "krum"

    @dataclass(frozen=True)
    class Options:
        num_malicious: int = 1
        num_selected: int = 1  # > 1 gives Multi-Krum

        def __post_init__(self) -> None:
            if self.num_malicious < 0 or self.num_selected < 1:
                raise ValueError("num_malicious must be >= 0 and num_selected >= 1")

    def __init__(self, scenario: Any, options: Any | None = None) -> None:
        super().__init__(scenario, options)
        m, f, k = self.sample_size(), self.options.num_malicious, self.options.num_selected
        if m <= 2 * f + 2:  # every round would be refused and the model never trained
            raise ConfigError("strategy.num_malicious",
                              f"Krum needs more than 2f + 2 = {2 * f + 2} updates a round, and this scenario samples "
                              f"{m} clients a round (max(floor(fraction_train · {self.num_partitions}), "
                              f"min_train_clients)), so every round would be refused",
                              f"sample at least {2 * f + 3} clients a round (strategy.fraction_train or "
                              f"strategy.min_train_clients) or lower strategy.num_malicious")
        if k > m - f:  # more than m - f picks must include a Byzantine update whenever f are present
            raise ConfigError("strategy.num_selected",
                              f"Multi-Krum averaging {k} of the {m} updates of a round would include at least "
                              f"{k - (m - f)} of the {f} Byzantine updates it assumes (num_malicious)",
                              f"set strategy.num_selected <= {m - f} (m - f; 1 = Krum)")

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        m, f = len(updates), self.options.num_malicious
        if m <= 2 * f + 2:
            raise AggregationError(
                f"Krum needs more than 2f+2 = {2 * f + 2} updates, got {m}",
                "sample more clients per round or lower strategy.num_malicious",
            )
        agg, _ = multi_krum([u.arrays for u in updates], f, self.options.num_selected)
        return agg
