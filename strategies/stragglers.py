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

Wall-clock: a worker's time in a round is ``overhead + base_time * load * jitter + delay * straggling``,
with ``load`` the fraction of the full gradient it computes. Uncoded training waits for all
workers, gradient coding (GC) for the fastest ``n - s``; sequential GC waits until
``(1 + mu) * fastest`` and treats later workers as stragglers, unless that pattern breaks its design
model, in which case it waits for everyone (the authors' simulator rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.errors import ConfigError

__all__ = [
    "ComputeTimeModel",
    "bernoulli_stragglers",
    "bursty_stragglers",
    "follows_bursty_model",
    "gc_round_times",
    "gilbert_elliott_stragglers",
    "satisfies_bursty_model",
    "sequential_round_times",
    "simulate_wallclock",
    "stragglers_from_times",
    "uncoded_round_times",
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

    def times(self, load: float, stragglers: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """``(rounds, n)`` worker times for a scheme with normalised ``load``."""
        return self.overhead + self.base_time * load * noise + self.straggler_delay * np.asarray(stragglers, float)


def uncoded_round_times(times: np.ndarray) -> np.ndarray:
    """Uncoded: the master waits for every worker."""
    return np.asarray(times).max(axis=-1)


def gc_round_times(times: np.ndarray, s: int) -> np.ndarray:
    """Gradient coding: the master waits for the fastest ``n - s`` workers."""
    times = np.asarray(times)
    n = times.shape[-1]
    return np.sort(times, axis=-1)[..., n - s - 1]


def sequential_round_times(times: np.ndarray, scheduler, mu: float) -> np.ndarray:
    """Drive a sequential-GC scheduler with stragglers detected from ``times`` (the ``mu`` rule).

    A round lasts ``min((1 + mu) * fastest, slowest)`` when the detected pattern follows the
    scheme's model, and ``slowest`` when the scheduler waited for everyone.
    """
    times = np.asarray(times, dtype=np.float64)
    out = np.empty(times.shape[0])
    for r, row in enumerate(times):
        report = scheduler.step(row > (1.0 + mu) * row.min())
        out[r] = row.max() if report.waited_for_all else min((1.0 + mu) * row.min(), row.max())
    return out


def simulate_wallclock(rng: np.random.Generator, pattern: np.ndarray, model: ComputeTimeModel, s: int,
                       B: int, W: int, lam: int, mu: float = 0.1, num_jobs: int | None = None) -> dict:
    """Total simulated wall-clock to finish ``num_jobs`` gradients under each scheme.

    ``pattern`` (``(rounds, n)``) says who is slowed down; it must cover ``num_jobs + W - 2 + B``
    rounds (the longest pipeline). The noise is shared between schemes (common random numbers).
    Returns ``{scheme: {"round_times": array, "total": float, "load": float}}`` for ``"uncoded"``,
    ``"gc"``, ``"sr-sgc"`` and ``"m-sgc"``.
    """
    from fedsim.strategies.sequential_gc import MultiplexedSGC, SelectiveRepeatSGC

    pattern = np.asarray(pattern, dtype=bool)
    n = pattern.shape[1]
    T_max = W - 2 + B
    jobs = num_jobs if num_jobs is not None else pattern.shape[0] - T_max
    sr = SelectiveRepeatSGC(n, B, W, lam, num_jobs=jobs) if (W - 1) % B == 0 else None
    ms = MultiplexedSGC(n, B, W, lam, num_jobs=jobs)
    if pattern.shape[0] < jobs + ms.T:
        raise ConfigError("stragglers.rounds", f"pattern has {pattern.shape[0]} rounds, need {jobs + ms.T}")
    noise = model.noise(rng, pattern.shape[0], n)
    result = {}
    t = model.times(1.0 / n, pattern[:jobs], noise[:jobs])
    result["uncoded"] = {"round_times": uncoded_round_times(t), "load": 1.0 / n}
    t = model.times((s + 1) / n, pattern[:jobs], noise[:jobs])
    result["gc"] = {"round_times": gc_round_times(t, s), "load": (s + 1) / n}
    for name, sched in (("sr-sgc", sr), ("m-sgc", ms)):
        if sched is None:
            continue
        rounds = jobs + sched.T
        t = model.times(sched.load, pattern[:rounds], noise[:rounds])
        result[name] = {"round_times": sequential_round_times(t, sched, mu), "load": sched.load}
    for v in result.values():
        v["total"] = float(v["round_times"].sum())
    return result
