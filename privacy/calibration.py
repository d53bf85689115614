"""Noise calibration: the smallest noise multiplier whose ε(δ) stays at or below a target.

The search is a bisection in log σ that only ever returns a σ it has evaluated with ε ≤ target,
so the answer never overshoots the target (Opacus's ``get_noise_multiplier`` contract, with its
``test_get_noise_multiplier_overshoot`` property), whatever the accountant's numerical quirks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsim.errors import ConfigError
from fedsim.privacy.accountants import make_accountant
from fedsim.privacy.events import Event, sampled_event

__all__ = ["Calibration", "calibrate_noise_multiplier", "epsilon_for"]

SIGMA_MIN = 1e-3
SIGMA_MAX = 1e4


@dataclass(frozen=True)
class Calibration:
    """Result of :func:`calibrate_noise_multiplier`: σ and the ε(δ) it achieves (≤ target)."""

    noise_multiplier: float
    epsilon: float
    evaluations: int


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "rdp", sampling: str = "poisson", population: int | None = None) -> float:
    """ε(δ) of ``steps`` sampled Gaussian releases with the given noise multiplier."""
    acc = make_accountant(accountant)
    event: Event = sampled_event(noise_multiplier, sample_rate, sampling, population)
    acc.compose(event, int(steps))
    return acc.epsilon(delta)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: str = "rdp", *, sampling: str = "poisson",
                               population: int | None = None, epsilon_tolerance: float = 0.01,
                               sigma_rtol: float = 1e-4) -> Calibration:
    """Smallest σ (to tolerance) with ε(δ) ≤ ``target_epsilon``; never overshoots the target.

    Parameters
    ----------
    target_epsilon : float
        The budget ε; the returned σ gives ε ≤ this value.
    delta : float
        The δ of (ε, δ)-DP.
    sample_rate : float
        q, the probability (Poisson) or fraction (fixed-size) of records per step.
    steps : int
        Number of sampled releases.
    accountant : str (default: "rdp")
        A name from :data:`~fedsim.privacy.accountants.ACCOUNTANTS`.
    sampling : str (default: "poisson")
        ``"poisson"`` or ``"fixed"`` (without replacement, replace-one neighbours).
    epsilon_tolerance : float (default: 0.01)
        Stop once target − ε(σ) < this (Opacus uses the same default).
    sigma_rtol : float (default: 1e-4)
        Or once the bracket on σ is this narrow, relatively.

    Raises
    ------
    ConfigError
        On invalid inputs, or when even σ = 10⁴ cannot reach the target.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError("privacy.target_epsilon", f"must be a positive finite number, got {target_epsilon}",
                          "pick a budget such as 1, 3 or 8")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError("privacy.steps", f"must be a positive integer, got {steps!r}",
                          "pass the number of rounds (or DP-SGD steps) to be run")

    evaluations = 0

    def eps(sigma: float) -> float:
        nonlocal evaluations
        evaluations += 1
        return epsilon_for(sigma, sample_rate, steps, delta, accountant, sampling, population)

    # Bracket: hi satisfies the target, lo does not (or lo is the floor and satisfies it too).
    hi = 1.0
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        if hi >= SIGMA_MAX:
            raise ConfigError("privacy.target_epsilon",
                              f"ε={target_epsilon:g} at δ={delta:g} is unreachable: even noise multiplier "
                              f"{SIGMA_MAX:g} gives ε={eps_hi:.4g} (q={sample_rate:g}, {steps} steps, "
                              f"{accountant} accountant)",
                              "raise the target ε or δ, lower the sample rate, or run fewer steps")
        hi = min(hi * 4.0, SIGMA_MAX)
        eps_hi = eps(hi)
    lo = hi / 4.0 if hi > 1.0 else hi
    if hi <= 1.0:
        while True:
            lo = max(lo / 4.0, SIGMA_MIN)
            eps_lo = eps(lo)
            if eps_lo > target_epsilon:
                break
            hi, eps_hi = lo, eps_lo
            if lo <= SIGMA_MIN:
                return Calibration(hi, eps_hi, evaluations)
    # Invariant: eps(hi) <= target < eps(lo).
    while target_epsilon - eps_hi >= epsilon_tolerance and (hi - lo) > sigma_rtol * hi:
        mid = math.sqrt(lo * hi)
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return Calibration(hi, eps_hi, evaluations)
