"""DP-FTRL: tree-aggregated noise on the running sum of clipped updates, and its accounting.

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep) Learning without
Sampling or Shuffling", ICML 2021 (arXiv 2103.00039).

:class:`DPFTRLNoise` is the pure, stateful math. Each step it takes the sum of the clipped updates
of that step (a list of arrays, one per layer) and returns the noisy cumulative sum
G_t + b_t, where b_t is the binary-tree noise (node std z·C). The caller turns it into parameters,
e.g. θ_{t+1} = θ_0 − lr·(G_t + b_t)/m, or with momentum v ← γv + (G_t + b_t).

*Restarts* (every ``restart_every`` steps): the current noisy sum is folded into a carried total,
G ← G + b_last, and a fresh tree starts. *Tree completion*: before a restart the tree is advanced
with virtual zero steps until its size is a power of two, so b_last is the root's noise alone.
No completion happens after the last segment (it is done lazily, when the next segment starts).

Accounting (their ``privacy.py``): within one tree, sens² = max over records of Σ_nodes
(multiplicity of the record in the node)²; virtual steps count (completion adds higher nodes); the
trees' ρ = sens²/(2z²) add up. The release is a Gaussian mechanism (adaptive composition of
Gaussians), so the total is μ-GDP with μ = sqrt(2ρ): a ``ZCDPEvent(rho, gaussian=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.privacy.analysis import zcdp_to_epsilon
from fedsim.privacy.counters import TreeNoise, tree_levels
from fedsim.privacy.events import ZCDPEvent
from fedsim.rng import numpy_rng

__all__ = [
    "DPFTRLNoise",
    "dp_ftrl_epsilon",
    "dp_ftrl_rho",
    "epoch_sensitivity_squared",
    "tree_sensitivity_squared",
]


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def tree_sensitivity_squared(participation_steps: Iterable[int], tree_size: int) -> int:
    """Σ over released nodes of (times the record appears in the node)² for one tree.

    Parameters
    ----------
    participation_steps : iterable of int
        The 1-based steps of the tree at which the record contributes.
    tree_size : int
        Steps of the tree including virtual completion steps; a node of height h and index i
        (steps i·2^h + 1 … (i+1)·2^h) is released only if (i + 1)·2^h ≤ tree_size.
    """
    steps = np.asarray(sorted(set(int(s) for s in participation_steps)), dtype=np.int64)
    if steps.size and (steps.min() < 1 or steps.max() > tree_size):
        raise ConfigError("dp_ftrl.participation", f"steps must lie in 1..{tree_size}", "check the schedule")
    total = 0
    for h in range(tree_levels(tree_size)):
        idx = (steps - 1) >> h
        idx = idx[((idx + 1) << h) <= tree_size]
        if idx.size:
            total += int(np.sum(np.unique(idx, return_counts=True)[1].astype(np.int64) ** 2))
    return total


def epoch_sensitivity_squared(steps_per_epoch: int, epochs: int, tree_size: int) -> int:
    """sens² of one tree spanning ``epochs`` passes in a fixed order (worst position in the epoch).

    A record at position j of the epoch contributes at steps j + 1 + e·steps_per_epoch.
    """
    j = np.arange(steps_per_epoch, dtype=np.int64)[:, None]
    steps = j + 1 + np.arange(epochs, dtype=np.int64)[None, :] * steps_per_epoch  # (spe, epochs)
    best = np.zeros(steps_per_epoch, dtype=np.int64)
    for h in range(tree_levels(tree_size)):
        idx = (steps - 1) >> h
        valid = ((idx + 1) << h) <= tree_size
        key = (j * (tree_size + 1) + idx)[valid]
        uniq, counts = np.unique(key, return_counts=True)
        best += np.bincount(uniq // (tree_size + 1), weights=counts.astype(np.float64) ** 2,
                            minlength=steps_per_epoch).astype(np.int64)
    return int(best.max())


def dp_ftrl_rho(noise_multiplier: float, steps_per_epoch: int, epochs: int,
                restart_every_epochs: int | None = None, tree_completion: bool = True) -> float:
    """Total ρ of DP-FTRL over ``epochs`` passes with a fresh tree every ``restart_every_epochs``.

    Every tree but the last is completed to a power-of-two size when ``tree_completion``.
    Without restarts (``None``) one tree spans all epochs.
    """
    if not noise_multiplier > 0:
        return math.inf
    per_tree = epochs if restart_every_epochs is None else int(restart_every_epochs)
    n_trees = math.ceil(epochs / per_tree)
    sens2 = 0
    for k in range(n_trees):
        e = min(per_tree, epochs - k * per_tree)
        size = e * steps_per_epoch
        if tree_completion and k < n_trees - 1:
            size = _next_pow2(size)
        sens2 += epoch_sensitivity_squared(steps_per_epoch, e, size)
    return sens2 / (2.0 * noise_multiplier**2)


def dp_ftrl_epsilon(noise_multiplier: float, steps_per_epoch: int, epochs: int, delta: float,
                    restart_every_epochs: int | None = None, tree_completion: bool = True) -> float:
    """ε(δ) of :func:`dp_ftrl_rho` through the CKS ρ-zCDP conversion."""
    return zcdp_to_epsilon(dp_ftrl_rho(noise_multiplier, steps_per_epoch, epochs,
                                       restart_every_epochs, tree_completion), delta)


class DPFTRLNoise:
    """Noisy cumulative sum of clipped updates by tree aggregation, with restarts and completion.

    Parameters
    ----------
    noise_multiplier : float
        z; every tree node gets N(0, (z·C)²) per coordinate.
    clip_norm : float
        C, the ℓ2 bound of one record's (client's) contribution to a step's sum.
    restart_every : int, optional
        Start a fresh tree after this many real steps (e.g. the rounds of K epochs).
    tree_completion : bool (default: True)
        Complete a tree to a power-of-two size before restarting.
    efficient : bool (default: False)
        Honaker's variance-reduced node estimates (same privacy, up to 2× less variance).
    seed : int, optional
        Root seed; the noise of node (tree, height, index) comes from
        ``numpy_rng(seed, "dp-ftrl", tree, height, index)``. ``None`` draws from OS entropy.
    """

    def __init__(self, noise_multiplier: float, clip_norm: float, *, restart_every: int | None = None,
                 tree_completion: bool = True, efficient: bool = False, seed: int | None = None) -> None:
        if noise_multiplier < 0 or not clip_norm > 0:
            raise ConfigError("dp_ftrl", f"need z >= 0 and C > 0, got z={noise_multiplier}, C={clip_norm}",
                              "set privacy.noise_multiplier and privacy.clip_norm")
        if restart_every is not None and restart_every < 1:
            raise ConfigError("dp_ftrl.restart_every", f"must be >= 1, got {restart_every}",
                              "pass the number of steps per tree, or None for no restart")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.restart_every = restart_every
        self.tree_completion = tree_completion
        self.efficient = efficient
        self.seed = seed
        self._os_rng = np.random.default_rng() if seed is None else None
        self.shapes: list[tuple[int, ...]] = []

    @property
    def node_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def init(self, shapes: Sequence[tuple[int, ...]]) -> None:
        """Start from scratch for parameters of these shapes."""
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self._size = int(sum(int(np.prod(s)) for s in self.shapes))
        self.steps = 0
        self.tree_index = 0
        self.finished_tree_sizes: list[int] = []
        self._carry = np.zeros(self._size)
        self._segment_sum = np.zeros(self._size)
        self._tree = self._new_tree()

    def _new_tree(self) -> TreeNoise:
        tree = self.tree_index

        def draw(height: int, index: int) -> np.ndarray:
            rng = self._os_rng if self._os_rng is not None else numpy_rng(self.seed, "dp-ftrl", tree, height, index)
            return rng.standard_normal(self._size) * self.node_std

        return TreeNoise((self._size,), draw, honaker=self.efficient)

    def _restart(self) -> None:
        b_last = self._tree.complete() if self.tree_completion else self._tree.cumulative()
        self._carry = self._carry + self._segment_sum + b_last
        self.finished_tree_sizes.append(self._tree.steps)
        self.tree_index += 1
        self._segment_sum = np.zeros(self._size)
        self._tree = self._new_tree()

    def step(self, sum_of_clipped_updates: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Add one step's sum of clipped updates; return the noisy cumulative sum, per layer."""
        if not self.shapes:
            raise ConfigError("dp_ftrl", "step() called before init(shapes)", "call init with the model's shapes")
        if [tuple(np.shape(a)) for a in sum_of_clipped_updates] != self.shapes:
            raise ConfigError("dp_ftrl", "update shapes differ from those given to init()",
                              "pass one array per layer, shaped like the model")
        if self.restart_every is not None and self._tree.steps >= self.restart_every:
            self._restart()
        flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in sum_of_clipped_updates])
        self._segment_sum = self._segment_sum + flat
        self.steps += 1
        noisy = self._carry + self._segment_sum + self._tree.step()
        return self._unflatten(noisy)

    def _unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for s in self.shapes:
            n = int(np.prod(s))
            out.append(flat[start : start + n].reshape(s))
            start += n
        return out

    @property
    def tree_sizes(self) -> list[int]:
        """Steps (virtual ones included) of every tree so far, the current one last."""
        return [*self.finished_tree_sizes, self._tree.steps]

    def single_participation_event(self) -> ZCDPEvent:
        """zCDP event when each record contributes at most once per tree: ρ = Σ_trees L(size)/(2z²)."""
        if self.noise_multiplier == 0:
            return ZCDPEvent(math.inf)
        levels = sum(tree_levels(n) for n in self.tree_sizes if n)
        return ZCDPEvent(levels / (2.0 * self.noise_multiplier**2))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (the noise already drawn included)."""
        return {"shapes": [list(s) for s in self.shapes], "steps": self.steps, "tree_index": self.tree_index,
                "finished_tree_sizes": list(self.finished_tree_sizes), "carry": self._carry.copy(),
                "segment_sum": self._segment_sum.copy(), "tree": self._tree.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.init([tuple(s) for s in state["shapes"]])
        self.steps = int(state["steps"])
        self.tree_index = int(state["tree_index"])
        self.finished_tree_sizes = [int(n) for n in state["finished_tree_sizes"]]
        self._carry = np.asarray(state["carry"], dtype=np.float64).copy()
        self._segment_sum = np.asarray(state["segment_sum"], dtype=np.float64).copy()
        self._tree = self._new_tree()
        self._tree.load_state_dict(state["tree"])
