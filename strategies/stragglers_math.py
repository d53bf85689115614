"""Straggler models and a simulated wall-clock per round (pure NumPy, seeded).

References
----------
* i.i.d. Bernoulli stragglers: the usual baseline.
* Gilbert–Elliott: every worker is a two-state Markov chain (good -> bad with probability ``p``,
  bad -> good with ``q``; stationary straggle probability ``p / (p + q)``, mean burst ``1 / q``).
  A natural generator of bursty patterns; its use in the sequential-GC paper is NOT confirmed
  (spec section 8, item 4).
* ``(B, W, lambda)`` bursty model: Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for
  Straggler Mitigation", ICLR 2023 (arXiv 2211.13802); the check follows the authors' simulator
  (mamaj/Sequential-Gradient-Coding-2, ``follows_straggler_model``): in every window of ``W``
  consecutive rounds at most ``lambda`` distinct workers straggle, and a worker straggling in round
  ``r`` did not straggle in rounds ``r-W+1 .. r-B`` (so its straggles in a window fit in one burst of
  length <= ``B``).

Patterns are boolean arrays of shape ``(rounds, n)``; ``True`` = straggler.

Wall-clock: a worker's time in a round is ``overhead + base_time * load * jitter + delay * straggling``
(:class:`ComputeTimeModel`), with ``load`` the fraction of the full gradient it computes. Sequential
GC treats workers slower than ``(1 + mu) * fastest`` as stragglers (:func:`stragglers_from_times`).
The offline comparison of the schemes' round times (uncoded, GC, SR-SGC, M-SGC) is in
``bench/compare_coded.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.errors import ConfigError

__all__ = [
    "ComputeTimeModel",
    "bernoulli_stragglers",
    "bursty_stragglers",
    "draw_stragglers",
    "follows_bursty_model",
    "gilbert_elliott_stragglers",
    "satisfies_bursty_model",
    "stragglers_from_times",
]


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ConfigError(name, f"must be a probability in [0, 1], got {p}")


def bernoulli_stragglers(rng: np.random.Generator, n: int, rounds: int, p: float) -> np.ndarray:
    """i.i.d. stragglers: each worker straggles in each round with probability ``p``."""
    _check_prob("stragglers.p", p)
    return rng.random((rounds, n)) < p


def gilbert_elliott_stragglers(rng: np.random.Generator, n: int, rounds: int, p_good_to_bad: float,
                               p_bad_to_good: float, start: str = "stationary") -> np.ndarray:
    """Bursty stragglers: one two-state Markov chain per worker.

    Parameters
    ----------
    p_good_to_bad, p_bad_to_good
        Transition probabilities ``p`` and ``q``.
    start
        ``"stationary"`` (bad with probability ``p / (p + q)``) or ``"good"``.
    """
    _check_prob("stragglers.p_good_to_bad", p_good_to_bad)
    _check_prob("stragglers.p_bad_to_good", p_bad_to_good)
    out = np.zeros((rounds, n), dtype=bool)
    if rounds == 0:
        return out
    if start == "stationary":
        total = p_good_to_bad + p_bad_to_good
        pi_bad = p_good_to_bad / total if total > 0 else 0.0
        state = rng.random(n) < pi_bad
    elif start == "good":
        state = np.zeros(n, dtype=bool)
    else:
        raise ConfigError("stragglers.start", f"unknown start {start!r}", "use 'stationary' or 'good'")
    for r in range(rounds):
        out[r] = state
        u = rng.random(n)
        state = np.where(state, u >= p_bad_to_good, u < p_good_to_bad)
    return out


def _check_bwl(B: int, W: int, lam: int) -> None:
    if B < 1 or W < B + 1 or lam < 0:
        raise ConfigError("stragglers.bursty", f"need B >= 1, W >= B + 1, lambda >= 0; got B={B}, W={W}, "
                          f"lambda={lam}")


def follows_bursty_model(history: np.ndarray, current: np.ndarray, B: int, W: int, lam: int) -> bool:
    """Does adding ``current`` (``(n,)``) to the past pattern ``history`` (``(r, n)``) keep ``(B, W, lambda)``?

    Spatial: at most ``lam`` distinct stragglers in rounds ``r-W+1 .. r``.
    Temporal: no current straggler straggled in rounds ``r-W+1 .. r-B``.
    """
    history = np.asarray(history, dtype=bool).reshape(-1, np.size(current))
    current = np.asarray(current, dtype=bool)
    r = history.shape[0]
    recent = history[max(0, r + 1 - W):r].any(axis=0)
    if int((recent | current).sum()) > lam:
        return False
    earlier = history[max(0, r + 1 - W):max(0, r + 1 - B)].any(axis=0)
    return not bool((earlier & current).any())


def satisfies_bursty_model(pattern: np.ndarray, B: int, W: int, lam: int) -> bool:
    """Whether a whole ``(rounds, n)`` pattern conforms to the ``(B, W, lambda)`` model."""
    pattern = np.asarray(pattern, dtype=bool)
    return all(follows_bursty_model(pattern[:r], pattern[r], B, W, lam) for r in range(pattern.shape[0]))


def bursty_stragglers(rng: np.random.Generator, n: int, rounds: int, B: int, W: int, lam: int,
                      p_start: float = 0.05, p_continue: float = 0.7) -> np.ndarray:
    """A random pattern that conforms to ``(B, W, lambda)`` by construction.

    Each round, workers (in random order) propose to straggle: with ``p_continue`` when their
    current burst is shorter than ``B``, with ``p_start`` otherwise; a proposal is accepted only if
    the pattern still follows the model.
    """
    _check_bwl(B, W, lam)
    _check_prob("stragglers.p_start", p_start)
    _check_prob("stragglers.p_continue", p_continue)
    out = np.zeros((rounds, n), dtype=bool)
    burst = np.zeros(n, dtype=int)            # length of the ongoing burst (0 = none)
    for r in range(rounds):
        current = np.zeros(n, dtype=bool)
        for i in rng.permutation(n):
            in_burst = 0 < burst[i] < B
            if rng.random() >= (p_continue if in_burst else p_start):
                continue
            current[i] = True
            if not follows_bursty_model(out[:r], current, B, W, lam):
                current[i] = False
        burst = np.where(current, burst + 1, 0)
        out[r] = current
    return out


def draw_stragglers(kind: str, rng: np.random.Generator, n: int, rounds: int, *, p: float = 0.1,
                    p_good_to_bad: float = 0.05, p_bad_to_good: float = 0.5, B: int = 1, W: int = 3, lam: int = 1,
                    p_start: float = 0.05, p_continue: float = 0.7) -> np.ndarray:
    """A ``(rounds, n)`` pattern of the model ``kind``: ``"none"``, ``"bernoulli"`` (``p``),
    ``"gilbert_elliott"`` (``p_good_to_bad``, ``p_bad_to_good``) or ``"bursty"`` (``B``, ``W``, ``lam``,
    ``p_start``, ``p_continue``)."""
    if kind == "bernoulli":
        return bernoulli_stragglers(rng, n, rounds, p)
    if kind == "gilbert_elliott":
        return gilbert_elliott_stragglers(rng, n, rounds, p_good_to_bad, p_bad_to_good)
    if kind == "bursty":
        return bursty_stragglers(rng, n, rounds, B, W, lam, p_start, p_continue)
    if kind == "none":
        return np.zeros((rounds, n), dtype=bool)
    raise ConfigError("stragglers", f"unknown straggler model {kind!r}",
                      "use none, bernoulli, gilbert_elliott or bursty")


def stragglers_from_times(times: np.ndarray, mu: float) -> np.ndarray:
    """Workers slower than ``(1 + mu) * fastest`` in their round (``times`` is ``(rounds, n)``)."""
    times = np.asarray(times, dtype=np.float64)
    return times > (1.0 + mu) * times.min(axis=-1, keepdims=True)


@dataclass(frozen=True)
class ComputeTimeModel:
    """Per-worker time in a round: ``overhead + base_time * load * jitter + straggler_delay * straggling``.

    Attributes
    ----------
    base_time
        Seconds for one worker to compute the gradient of the WHOLE data set (load 1).
    jitter
        Sigma of the log-normal multiplicative noise (0 = deterministic).
    straggler_delay
        Extra seconds for a straggling worker.
    overhead
        Fixed seconds per round (communication, model download).
    """

    base_time: float = 1.0
    jitter: float = 0.05
    straggler_delay: float = 1.0
    overhead: float = 0.0

    def noise(self, rng: np.random.Generator, rounds: int, n: int) -> np.ndarray:
        """Multiplicative noise factors, to be shared by the schemes being compared."""
        if self.jitter == 0:
            return np.ones((rounds, n))
        return rng.lognormal(mean=0.0, sigma=self.jitter, size=(rounds, n))

    def times(self, load: float | np.ndarray, stragglers: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Worker times (the shape of ``noise``, e.g. ``(rounds, n)``) for the normalised ``load``: one
        number for every worker, or an array broadcasting against ``noise`` (one load per worker)."""
        return self.overhead + self.base_time * load * noise + self.straggler_delay * np.asarray(stragglers, float)
