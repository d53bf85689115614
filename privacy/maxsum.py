"""MaxSum and SumSelect under continual observation (event-level ρ-zCDP).

Jain, Raskhodnikova, Sivakumar, Smith, "The Price of Differential Privacy under Continual
Observation", ICML 2023 (arXiv 2112.00828). Stream x_t ∈ {0,1}^d; at every t release
MaxSum_t = max_j S_t[j] or an index ĵ with S_t[ĵ] near that maximum (SumSelect; error
max_j S_t[j] − S_t[ĵ]). The paper's rate is Θ̃(min{T^{1/3}/ε^{2/3}, √d/ε, T}); two branches:

* ``"counters"`` (the √d branch): one Gaussian tree counter per coordinate. A record moves the
  d-vector of counts by ≤ √d in ℓ2, so the vector counter has sensitivity √d (node variance
  d·L/(2ρ)); release the max / argmax of the noisy counts.
  Error ≤ sqrt(2 ln(2dT/β))·L·sqrt(d/(2ρ)) w.p. 1 − β.
* ``"block"`` (the T^{1/3} branch): a fresh answer every k steps, m = ⌈T/k⌉ releases at ρ/m each.
  MaxSum has sensitivity 1 and grows by ≤ 1 per step, so a k-step-old answer is off by ≤ k − 1.
  MaxSum gets N(0, m/(2ρ)); SumSelect uses report-noisy-max with Gumbel noise (the exponential
  mechanism) at ε_i = sqrt(2ρ/m) (ε-DP implies ε²/2-zCDP; Cesar–Rogers 2021 allow ε²/8, not used).
  MaxSum error ≤ (k − 1) + sqrt(m/(2ρ))·sqrt(2 ln(2m/β)); k ≈ (T/ρ)^{1/3} gives Õ((T/ρ)^{1/3})
  (SumSelect: see :func:`block_error_bound`). This fixed block schedule is the spec's own
  derivation (§6.5); the paper's construction (recalled in the spec, not confirmed here, as
  sparse-vector-triggered re-releases) is not implemented. The rate is the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.privacy.counters import BinaryTreeCounter, tree_levels

__all__ = [
    "MaxSumRelease",
    "block_error_bound",
    "counters_error_bound",
    "leader_switching_stream",
    "maxsum_error",
    "optimal_block_length",
    "sumselect_error",
]


def counters_error_bound(horizon: int, dim: int, rho: float, beta: float = 0.05, select: bool = False) -> float:
    """High-probability (1 − β) bound on the √d branch's error over all t ≤ T.

    Every noisy count is within sqrt(2 ln(2dT/β))·L·sqrt(d/(2ρ)) of the truth; MaxSum is off by at
    most that, SumSelect's gap by at most twice that.
    """
    levels = tree_levels(horizon)
    one = math.sqrt(2.0 * math.log(2.0 * dim * horizon / beta)) * levels * math.sqrt(dim / (2.0 * rho))
    return 2.0 * one if select else one


def block_error_bound(horizon: int, rho: float, block: int, beta: float = 0.05, select: bool = False,
                      dim: int = 2) -> float:
    """High-probability (1 − β) bound on the block branch's error for block length k.

    Staleness costs ≤ k − 1 (the max grows by ≤ 1 per step, a chosen count never shrinks). MaxSum:
    a Gaussian of std sqrt(m/(2ρ)) over m releases. SumSelect: Gumbel noise of scale b = 2/ε_i
    leaves a gap ≤ max_j G_j − min_j G_j ≤ b·(ln(2md/β) + ln ln(2md/β)) over all m·d draws.
    """
    releases = math.ceil(horizon / block)
    if select:
        scale = 2.0 / math.sqrt(2.0 * rho / releases)
        log_term = math.log(2.0 * releases * dim / beta)
        return (block - 1) + scale * (log_term + math.log(log_term))
    return (block - 1) + math.sqrt(releases / (2.0 * rho)) * math.sqrt(2.0 * math.log(2.0 * releases / beta))


def optimal_block_length(horizon: int, rho: float, beta: float = 0.05, select: bool = False, dim: int = 2) -> int:
    """The k in 1..T minimising :func:`block_error_bound` (≈ (T/ρ)^{1/3})."""
    ks = np.unique(np.geomspace(1, horizon, num=min(horizon, 400)).astype(int))
    return int(min(ks, key=lambda k: block_error_bound(horizon, rho, int(k), beta, select, dim)))


def leader_switching_stream(horizon: int, dim: int = 2, phase: int | None = None) -> np.ndarray:
    """A {0,1}^d stream whose leader keeps changing.

    Phase 0 (length P ≈ T/8) feeds coordinate 0; every later phase lasts 2P and feeds coordinate
    p mod d, which therefore catches up with the leader after P steps and then overtakes it.
    """
    phase = phase or max(1, horizon // 8)
    stream = np.zeros((horizon, dim))
    start, p = 0, 0
    while start < horizon:
        length = phase if p == 0 else 2 * phase
        stream[start : start + length, p % dim] = 1.0
        start, p = start + length, p + 1
    return stream


def maxsum_error(stream: np.ndarray, released: np.ndarray) -> float:
    """max_t |MaxSum_t − released_t|."""
    true = np.cumsum(np.asarray(stream, dtype=np.float64), axis=0).max(axis=1)
    return float(np.max(np.abs(true - np.asarray(released))))


def sumselect_error(stream: np.ndarray, indices: np.ndarray) -> float:
    """max_t (max_j S_t[j] − S_t[ĵ_t])."""
    sums = np.cumsum(np.asarray(stream, dtype=np.float64), axis=0)
    picked = sums[np.arange(len(sums)), np.asarray(indices, dtype=int)]
    return float(np.max(sums.max(axis=1) - picked))


class MaxSumRelease:
    """Streaming MaxSum (``select=False``) or SumSelect (``select=True``) under ρ-zCDP.

    Parameters
    ----------
    horizon : int
        T.
    dim : int
        d.
    rho : float
        ρ-zCDP for the whole stream, event-level (one record x_t changes).
    select : bool (default: False)
        Release an index (SumSelect) instead of a value (MaxSum).
    branch : str (default: "auto")
        ``"counters"``, ``"block"`` or ``"auto"`` (the smaller error bound).
    block : int, optional
        Block length k of the block branch; default :func:`optimal_block_length`.
    rng : np.random.Generator, optional
        Noise source.
    """

    def __init__(self, horizon: int, dim: int, rho: float, *, select: bool = False, branch: str = "auto",
                 block: int | None = None, beta: float = 0.05, rng: np.random.Generator | None = None) -> None:
        if horizon < 1 or dim < 1 or not rho > 0:
            raise ConfigError("maxsum", f"need T >= 1, d >= 1, ρ > 0; got T={horizon}, d={dim}, ρ={rho}",
                              "check the stream length, dimension and privacy budget")
        if branch not in ("auto", "counters", "block"):
            raise ConfigError("maxsum.branch", f"unknown branch {branch!r}", "use 'auto', 'counters' or 'block'")
        self.horizon, self.dim, self.rho, self.select = int(horizon), int(dim), float(rho), select
        self.rng = rng if rng is not None else np.random.default_rng()
        self.block = int(block) if block else optimal_block_length(self.horizon, self.rho, beta, select, self.dim)
        if branch == "auto":
            branch = ("counters" if counters_error_bound(self.horizon, self.dim, self.rho, beta, select)
                      < block_error_bound(self.horizon, self.rho, self.block, beta, select, self.dim) else "block")
        self.branch = branch
        self.releases = math.ceil(self.horizon / self.block)
        self.steps = 0
        self._sum = np.zeros(self.dim)
        self._last: Any = None
        if branch == "counters":
            self._counter = BinaryTreeCounter(self.horizon, self.rho, shape=(self.dim,),
                                              sensitivity=math.sqrt(self.dim), rng=self.rng)

    def _fresh_answer(self, sums: np.ndarray) -> Any:
        if self.select:  # report-noisy-max: Gumbel(2/ε) noise = exponential mechanism, sensitivity 1
            eps = math.sqrt(2.0 * self.rho / self.releases)
            return int(np.argmax(sums + self.rng.gumbel(0.0, 2.0 / eps, size=sums.shape)))
        return float(sums.max() + self.rng.standard_normal() * math.sqrt(self.releases / (2.0 * self.rho)))

    def update(self, x: Any) -> Any:
        """Add x_t ∈ {0,1}^d; return the MaxSum estimate (float) or the selected index (int)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,) or np.any((x != 0) & (x != 1)):
            raise ConfigError("maxsum.record", f"records must be 0/1 vectors of length {self.dim}",
                              "binarise the stream (x_t ∈ {0,1}^d)")
        if self.steps >= self.horizon:
            raise ConfigError("maxsum.horizon", f"stream is longer than T={self.horizon}", "raise the horizon")
        self.steps += 1
        self._sum = self._sum + x
        if self.branch == "counters":
            noisy = self._counter.update(x)
            return int(np.argmax(noisy)) if self.select else float(np.max(noisy))
        if (self.steps - 1) % self.block == 0:
            self._last = self._fresh_answer(self._sum)
        return self._last

    def release(self, stream: Any) -> np.ndarray:
        """Batch form of :meth:`update` over a (T', d) stream (same noise draws, vectorised)."""
        stream = np.asarray(stream, dtype=np.float64)
        if self.branch == "counters" or self.steps or len(stream) == 0 or len(stream) > self.horizon:
            return np.array([self.update(x) for x in stream])
        if np.any((stream != 0) & (stream != 1)) or stream.shape[1:] != (self.dim,):
            raise ConfigError("maxsum.record", f"records must be 0/1 vectors of length {self.dim}",
                              "binarise the stream (x_t ∈ {0,1}^d)")
        n = len(stream)
        sums = np.cumsum(stream, axis=0)
        at = np.arange(0, n, self.block)  # 0-based steps where a fresh answer is drawn
        if self.select:
            eps = math.sqrt(2.0 * self.rho / self.releases)
            answers = np.argmax(sums[at] + self.rng.gumbel(0.0, 2.0 / eps, size=(len(at), self.dim)), axis=1)
        else:
            answers = sums[at].max(axis=1) + self.rng.standard_normal(len(at)) * math.sqrt(
                self.releases / (2.0 * self.rho))
        self.steps, self._sum = n, sums[-1].copy()
        self._last = answers[-1].item()
        return np.repeat(answers, self.block)[:n]
