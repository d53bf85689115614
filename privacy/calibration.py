"""Noise calibration: the smallest noise multiplier whose ε(δ) stays at or below a target.

The search is a bisection in log σ that only ever returns a σ it has evaluated with ε ≤ target,
so the answer never overshoots the target (Opacus's ``get_noise_multiplier`` contract, with its
``test_get_noise_multiplier_overshoot`` property), whatever the accountant's numerical quirks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedsim.errors import ConfigError
from fedsim.privacy.accountants import ACCOUNTANTS, make_accountant
from fedsim.privacy.events import Event, sampled_event

__all__ = ["Calibration", "calibrate", "calibrate_noise_multiplier", "epsilon_for", "noise_floor"]

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

    context = f"q={sample_rate:g}, {steps} steps, {accountant} accountant"
    return calibrate(lambda sigma: epsilon_for(sigma, sample_rate, steps, delta, accountant, sampling, population),
                     target_epsilon, delta=delta, context=context, epsilon_tolerance=epsilon_tolerance,
                     sigma_rtol=sigma_rtol, floor=noise_floor(accountant))


def noise_floor(accountant: str) -> float:
    """The smallest σ a calibration for ``accountant`` tries: :data:`SIGMA_MIN`, or the accountant's own floor
    where it is higher (PLD: ``fedsim.privacy.bounds.PLD_MIN_NOISE``)."""
    return max(SIGMA_MIN, ACCOUNTANTS.get(accountant, key="privacy.accountant").min_noise)


def calibrate(epsilon_of: Callable[[float], float], target_epsilon: float, *, delta: float, context: str,
              epsilon_tolerance: float = 0.01, sigma_rtol: float = 1e-4, floor: float = SIGMA_MIN) -> Calibration:
    """Smallest σ (to tolerance) with ``epsilon_of(σ) ≤ target_epsilon``, for any ε(σ) that falls as σ grows.

    A bisection in log σ that returns only a σ it evaluated with ε ≤ target (never an interpolation).

    Parameters
    ----------
    epsilon_of : callable
        σ ↦ ε(δ) of the whole planned release.
    target_epsilon : float
        The budget ε.
    delta : float
        The δ, for messages.
    context : str
        What is being calibrated, for the message when the target is unreachable.
    epsilon_tolerance, sigma_rtol : float
        Stop once target − ε(σ) < ``epsilon_tolerance`` or the bracket on σ is ``sigma_rtol`` narrow.
    floor : float (default: :data:`SIGMA_MIN`)
        The smallest σ tried; when even it meets the target, it is returned (ε below the target).

    Raises
    ------
    ConfigError
        ``privacy.target_epsilon`` when even σ = 10⁴ gives ε above the target.
    """
    evaluations = 0

    def eps(sigma: float) -> float:
        nonlocal evaluations
        evaluations += 1
        return epsilon_of(sigma)

    # Bracket: hi satisfies the target, lo does not (or lo is the floor and satisfies it too).
    hi = 1.0
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        if hi >= SIGMA_MAX:
            raise ConfigError("privacy.target_epsilon",
                              f"ε={target_epsilon:g} at δ={delta:g} is unreachable: even noise multiplier "
                              f"{SIGMA_MAX:g} gives ε={eps_hi:.4g} ({context})",
                              "raise the target ε or δ, lower the sample rate, or run fewer steps")
        hi = min(hi * 4.0, SIGMA_MAX)
        eps_hi = eps(hi)
    lo = hi / 4.0 if hi > 1.0 else hi
    if hi <= 1.0:
        while True:
            lo = max(lo / 4.0, floor)
            eps_lo = eps(lo)
            if eps_lo > target_epsilon:
                break
            hi, eps_hi = lo, eps_lo
            if lo <= floor:
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


# ------------------------------------------------------------------ privacy.target_epsilon of a run
_RUN_CALIBRATIONS: dict[str, Calibration] = {}


def calibrate_scenario(scenario: Any, strategy_cls: Any) -> Calibration:
    """The noise multiplier that ``privacy.target_epsilon`` asks of this run, and the total ε(δ) it plans.

    The planned total is what the run's ledger (``fedsim.privacy.ledger``) reports after
    ``run.rounds`` rounds when every client takes part in every round (the worst case): the
    mechanisms of the strategy and, for DP-SGD, the server's per-client account (built as the run
    builds them, so the same accountant, sampling and local steps), plus the released counters,
    whose ε does not depend on σ. The σ found never overshoots: the planned total at σ is ≤ the
    target (Opacus ``make_private_with_epsilon`` for DP-SGD; pfl-research's
    ``GaussianMechanism.from_privacy_accountant`` for client-level DP, with the counters added).

    Parameters
    ----------
    scenario : fedsim.config.Scenario
        A scenario with ``privacy.target_epsilon > 0`` (its ``noise_multiplier`` is ignored here).
    strategy_cls : type
        The scenario's registered strategy class (its mechanisms are built with a trial σ).

    Raises
    ------
    ConfigError
        ``privacy.target_epsilon`` when the counters alone spend it, or no σ ≤ 10⁴ reaches it.
    """
    import json

    p = scenario.privacy
    plan = scenario.model_dump(mode="json")
    plan["privacy"]["noise_multiplier"] = 0.0
    key = json.dumps([strategy_cls.__name__, plan], sort_keys=True, default=str)
    if key not in _RUN_CALIBRATIONS:
        mechanisms, fixed = _planned_mechanisms(scenario, strategy_cls)
        target, delta, rounds = float(p.target_epsilon), float(p.delta), int(scenario.run.rounds)
        if fixed >= target:
            raise ConfigError("privacy.target_epsilon", f"the released counters alone spend ε = {fixed:.4g} at "
                              f"δ = {delta:g}, not below the target {target:g}, so no noise multiplier can meet it",
                              "raise privacy.target_epsilon or privacy.counter_noise, or set "
                              "privacy.release_counters = false")

        names = ", ".join(m.name for m in mechanisms)
        context = f"{names} over {rounds} rounds, {p.accountant} accountant, counters ε = {fixed:.3g}"
        found = _calibrate_worst_case(mechanisms, fixed, target, delta, rounds, context, noise_floor(p.accountant))
        _RUN_CALIBRATIONS[key] = found
    return _RUN_CALIBRATIONS[key]


def _calibrate_worst_case(mechanisms: list[Any], fixed: float, target: float, delta: float, rounds: int,
                          context: str, floor: float = SIGMA_MIN) -> Calibration:
    """Bisect σ on the worst clients only (one DP-SGD client at first: ε of each size is one RDP curve),
    then check every client at the σ found; a client worse there joins the candidates and σ is searched
    again. The answer is the σ whose *full* planned total is ≤ ``target``."""

    def total(sigma: float, mechs: list[Any]) -> float:
        return fixed + sum(m.with_noise_multiplier(sigma).epsilon_after(rounds, delta) for m in mechs)

    def worst(m: Any, sigma: float) -> int:
        eps = m.with_noise_multiplier(sigma).clients_after(rounds, delta)
        return max(eps, key=lambda i: (eps[i], -i))

    candidates = {k: [worst(m, 1.0)] for k, m in enumerate(mechanisms) if hasattr(m, "narrowed")}
    evaluations = 0
    while True:
        active = [m.narrowed(candidates[k]) if k in candidates else m for k, m in enumerate(mechanisms)]
        found = calibrate(lambda sigma: total(sigma, active), target, delta=delta, context=context,
                          epsilon_tolerance=target * 1e-3, sigma_rtol=1e-6, floor=floor)
        evaluations += found.evaluations + 1
        full = total(found.noise_multiplier, mechanisms)
        if full <= target:
            return Calibration(found.noise_multiplier, full, evaluations)
        for k in candidates:
            candidates[k].append(worst(mechanisms[k], found.noise_multiplier))


def _planned_mechanisms(scenario: Any, strategy_cls: Any) -> tuple[list[Any], float]:
    """The run's σ-dependent mechanisms (built with σ = 0, so no σ-dependent check of a strategy fires; the
    calibration only takes their plan, through ``with_noise_multiplier``) and the counters' fixed ε(δ)."""
    from fedsim.data.federation import federation_of
    from fedsim.privacy.ledger import released_counters
    from fedsim.privacy.mechanisms import DPSGDMechanism

    privacy = scenario.privacy.model_copy(update={"noise_multiplier": 0.0, "target_epsilon": 0.0})
    probe = scenario.model_copy(update={"privacy": privacy})
    mechanisms = list(strategy_cls(probe).privacy_mechanisms())
    federation = federation_of(probe)
    if privacy.mechanism == "dp-sgd":  # what FedSimStrategy.attach_server adds for the run
        mechanisms.append(DPSGDMechanism(probe, federation.client_sizes()))
    counters = released_counters(probe, int(federation.num_classes))
    return mechanisms, sum(c.epsilon(float(privacy.delta)) for c in counters)


def apply_target_epsilon(scenario: Any, strategy_cls: Any) -> Calibration | None:
    """Set ``privacy.noise_multiplier`` (in place) from ``privacy.target_epsilon``; ``None`` when no target.

    A scenario already calibrated (a run directory's ``config.toml`` holds both keys) is accepted only
    when its ``noise_multiplier`` is the one the target calibrates to; any other noise multiplier set
    beside a target is refused, naming both keys, since one of the two would have no effect.
    """
    p = scenario.privacy
    if not p.target_epsilon:
        return None
    found = calibrate_scenario(scenario, strategy_cls)
    if p.noise_multiplier == 0:
        p.noise_multiplier = found.noise_multiplier
    elif not math.isclose(p.noise_multiplier, found.noise_multiplier, rel_tol=1e-12, abs_tol=0.0):
        raise ConfigError("privacy.noise_multiplier", f"{p.noise_multiplier:g} is set together with "
                          f"privacy.target_epsilon = {p.target_epsilon:g}, which calibrates the noise multiplier "
                          f"itself (to {found.noise_multiplier:.6g}); one of the two would be ignored",
                          "set either privacy.noise_multiplier or privacy.target_epsilon, not both")
    return found
