"""Canary audits: an empirical lower bound on ε from many runs of a mechanism with and without a canary.

If a mechanism is (ε, δ)-DP, every test that tells "canary in" from "canary out" has
TPR ≤ e^ε·FPR + δ and TNR ≤ e^ε·FNR + δ. Measuring TPR and FPR of a threshold test over many
independent trials, with one-sided Clopper–Pearson bounds, gives with the stated confidence

    ε ≥ max( ln((TPR_lo − δ)/FPR_hi), ln((1 − FPR_hi − δ)/(1 − TPR_lo)) ).

A sound implementation must keep this below the claimed ε; a bug that weakens the noise pushes it
above (Jagielski, Ullman, Oprea, NeurIPS 2020; Nasr et al., S&P 2021 and USENIX Security 2023).
The threshold is chosen on one part of the trials (half by default) and the bound is computed on
the rest, so the selection does not bias the bound. Resolving power is capped near ln(trials): audit
mechanisms whose per-release ε is at most about 4. This module holds the statistics and a stand-alone
Gaussian audit; :mod:`fedsim.privacy.audit_run` audits a scenario's real training path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedsim.errors import ConfigError
from fedsim.privacy.analysis import gaussian_epsilon_exact
from fedsim.privacy.clipping import dp_fedavg_aggregate
from fedsim.rng import numpy_rng

__all__ = [
    "AuditResult",
    "audit_scores",
    "client_level_gaussian_audit",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "epsilon_from_rates",
]


def clopper_pearson_lower(successes: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided lower bound p_lo with P(p < p_lo) ≤ α (exact binomial, Clopper–Pearson 1934)."""
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lo = stats.beta.ppf(alpha, k, n - k + 1)
    return np.where(k <= 0, 0.0, lo)


def clopper_pearson_upper(successes: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided upper bound p_hi with P(p > p_hi) ≤ α."""
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        hi = stats.beta.ppf(1.0 - alpha, k + 1, n - k)
    return np.where(k >= n, 1.0, hi)


def epsilon_from_rates(tpr_lo: np.ndarray, fpr_hi: np.ndarray, delta: float) -> np.ndarray:
    """The ε lower bound implied by TPR ≥ tpr_lo and FPR ≤ fpr_hi (both directions of the test)."""
    tpr_lo, fpr_hi = np.asarray(tpr_lo, dtype=np.float64), np.asarray(fpr_hi, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(tpr_lo - delta, 0.0) / fpr_hi)
        b = np.log(np.maximum(1.0 - fpr_hi - delta, 0.0) / (1.0 - tpr_lo))
    out = np.fmax(np.nan_to_num(a, nan=-np.inf, posinf=np.inf), np.nan_to_num(b, nan=-np.inf, posinf=np.inf))
    return np.maximum(out, 0.0)


def _bounds(with_canary: np.ndarray, without: np.ndarray, thresholds: np.ndarray, alpha: float):
    tp = len(with_canary) - np.searchsorted(np.sort(with_canary), thresholds, side="right")
    fp = len(without) - np.searchsorted(np.sort(without), thresholds, side="right")
    return clopper_pearson_lower(tp, len(with_canary), alpha), clopper_pearson_upper(fp, len(without), alpha)


@dataclass(frozen=True)
class AuditResult:
    """Outcome of a canary audit."""

    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    threshold: float
    tpr_lower: float
    fpr_upper: float
    trials: int
    confidence: float

    @property
    def violated(self) -> bool:
        """True when the audit proves (at its confidence) that the claimed ε is wrong."""
        return self.epsilon_lower_bound > self.claimed_epsilon


def audit_scores(with_canary: Sequence[float], without: Sequence[float], *, delta: float,
                 claimed_epsilon: float, confidence: float = 0.95, num_thresholds: int = 200,
                 select_fraction: float = 0.5) -> AuditResult:
    """ε lower bound from scores of trials with and without the canary (higher = "canary in").

    The first ``select_fraction`` of each score list picks the threshold (the best bound among
    ``num_thresholds`` quantiles); the rest yields the bound, so the choice does not bias it. Each
    Clopper–Pearson bound is taken at α = (1 − confidence)/2, so both hold together with probability
    ≥ ``confidence``. The trials must be independent (one canary per run, fresh randomness per run).
    """
    s_in, s_out = np.asarray(with_canary, dtype=np.float64), np.asarray(without, dtype=np.float64)
    if min(len(s_in), len(s_out)) < 20:
        raise ConfigError("audit.trials", "too few trials for an audit", "use thousands of trials per side")
    if not 0 < select_fraction < 1:
        raise ConfigError("audit.select_fraction", f"must lie in (0, 1), got {select_fraction}",
                          "use 0.25–0.5: the rest of the trials yields the bound")
    if not np.all(np.isfinite(s_in)) or not np.all(np.isfinite(s_out)):
        raise ConfigError("audit.scores", "a trial's score is NaN or infinite",
                          "check the mechanism's output: a released model must be finite")
    alpha = (1.0 - confidence) / 2.0
    half_in, half_out = int(len(s_in) * select_fraction), int(len(s_out) * select_fraction)
    pick_in, eval_in = s_in[:half_in], s_in[half_in:]
    pick_out, eval_out = s_out[:half_out], s_out[half_out:]
    candidates = np.quantile(np.concatenate([pick_in, pick_out]), np.linspace(0.0, 1.0, num_thresholds))
    eps_pick = epsilon_from_rates(*_bounds(pick_in, pick_out, candidates, alpha), delta)
    threshold = float(candidates[int(np.argmax(eps_pick))])
    tpr_lo, fpr_hi = _bounds(eval_in, eval_out, np.array([threshold]), alpha)
    eps = float(epsilon_from_rates(tpr_lo, fpr_hi, delta)[0])
    return AuditResult(eps, float(claimed_epsilon), float(delta), threshold, float(tpr_lo[0]), float(fpr_hi[0]),
                       len(s_in) + len(s_out), confidence)


Aggregate = Callable[..., object]


def client_level_gaussian_audit(noise_multiplier: float, *, trials: int = 10_000, delta: float = 1e-5,
                                clip_norm: float = 1.0, num_clients: int = 4, dim: int = 4,
                                aggregate: Aggregate = dp_fedavg_aggregate, claimed_epsilon: float | None = None,
                                confidence: float = 0.95, seed: int = 0) -> AuditResult:
    """Audit one client-level DP-FedAvg release (the server's view: it sees the noisy mean).

    Each trial aggregates ``num_clients`` known updates, plus, in "in" trials, a canary client whose
    update is 2C along a fixed unit vector u (so clipping is exercised). The score is the projection
    of the released mean on u minus the known clients' part; the claimed ε is the exact ε(δ) of the
    Gaussian mechanism with μ = 1/z (canary replaces nothing: add/remove neighbours, m fixed).

    Parameters
    ----------
    aggregate : callable
        Same signature as :func:`~fedsim.privacy.clipping.dp_fedavg_aggregate` (pass a wrapper to
        audit another implementation, or to plant a bug).
    """
    if claimed_epsilon is None:
        claimed_epsilon = gaussian_epsilon_exact(1.0 / noise_multiplier, delta)
    rng = numpy_rng(seed, "audit", "client-level-gaussian")
    u = np.zeros(dim)
    u[0] = 1.0
    others = [[v] for v in rng.normal(size=(num_clients, dim)) * (0.5 * clip_norm / math.sqrt(dim))]
    canary = [2.0 * clip_norm * u]
    m = num_clients + 1  # fixed denominator: the sampled cohort size whether or not the canary is in
    known = float(np.sum([o[0] @ u for o in others])) / m  # the others' norms are below C: unclipped
    scores = {True: np.empty(trials), False: np.empty(trials)}
    for include in (True, False):
        for i in range(trials):
            updates = others + [canary] if include else others
            out = aggregate(updates, clip_norm, noise_multiplier, rng, denominator=m)
            scores[include][i] = float(out.update[0] @ u) - known
    return audit_scores(scores[True], scores[False], delta=delta, claimed_epsilon=claimed_epsilon,
                        confidence=confidence)
