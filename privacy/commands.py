"""Back-ends of the privacy CLI commands: pure functions returning JSON-able dicts.

The CLI (Typer) only parses options, calls these and prints the result; errors are the typed
``FedSimError`` subclasses raised underneath (mapped to exit codes by the CLI).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.privacy.accountants import make_accountant
from fedsim.privacy.bounds import MAX_NOISE, MIN_NOISE, outside_accountable_range
from fedsim.privacy.calibration import calibrate_noise_multiplier
from fedsim.privacy.counters import COUNTERS
from fedsim.privacy.events import sampled_event
from fedsim.rng import numpy_rng

__all__ = ["calibrate", "counter_variance", "epsilon"]

_MAX_CELLS = 1 << 22  # T × trials values simulated at once (32 MiB of float64)


def epsilon(noise: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp",
            sampling: str = "poisson", population: int | None = None) -> dict[str, Any]:
    """ε(δ) of ``steps`` sampled Gaussian releases (DP-SGD steps or DP-FedAvg rounds).

    ``sampling="fixed"`` accounts fixed-size batches drawn without replacement (replace-one
    neighbours, RDP only); ``population`` then fixes m = round(q·n).
    """
    if outside_accountable_range(noise):
        raise ConfigError("noise", f"{noise:g} is outside 0 or [{MIN_NOISE:g}, {MAX_NOISE:g}], where the accountants' "
                          "arithmetic is sound (1/σ² and σ² underflow or overflow beyond it)",
                          f"pass --noise 0 (no noise: ε = ∞) or a value in [{MIN_NOISE:g}, {MAX_NOISE:g}]")
    acc = make_accountant(accountant)
    acc.compose(sampled_event(noise, sample_rate, sampling, population), int(steps))
    eps = acc.epsilon(delta)
    return {"epsilon": eps if math.isfinite(eps) else None, "delta": delta, "noise_multiplier": noise,
            "sample_rate": sample_rate, "steps": int(steps), "accountant": accountant, "sampling": sampling,
            "finite": math.isfinite(eps)}


def counter_variance(mechanism: str, T: int, rho: float, trials: int, seed: int = 0) -> dict[str, Any]:
    """Measured vs theoretical per-step noise variance of a continual-release counter.

    Runs ``trials`` independent counters (one coordinate each of a vector counter) on an all-zero
    scalar stream of length T, sensitivity 1, ρ-zCDP, and reports for t = 1..T the mean squared
    error across trials next to ``theoretical_variance(t)``.
    """
    if not isinstance(T, int) or T < 1 or not isinstance(trials, int) or trials < 2:
        raise ConfigError("counter", f"need T >= 1 and trials >= 2, got T={T!r}, trials={trials!r}",
                          "e.g. --T 1024 --trials 2000")
    cls = COUNTERS.get(mechanism, key="counter.mechanism")
    rng = numpy_rng(seed, "counter-variance", mechanism)
    chunk = max(1, min(trials, _MAX_CELLS // T))
    total = np.zeros(T)
    theory = None
    done = 0
    while done < trials:
        width = min(chunk, trials - done)
        counter = cls(T, rho, shape=(width,), rng=rng)
        total += np.sum(counter.release(np.zeros((T, width))) ** 2, axis=1)
        theory = counter.variances() if theory is None else theory
        done += width
    return {"mechanism": mechanism, "T": T, "rho": rho, "trials": trials, "seed": seed,
            "t": list(range(1, T + 1)), "measured_variance": (total / trials).tolist(),
            "theoretical_variance": [float(v) for v in theory]}


def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
              sampling: str = "poisson") -> dict[str, Any]:
    """Smallest noise multiplier whose ε(δ) does not exceed ``epsilon`` (never overshoots)."""
    result = calibrate_noise_multiplier(epsilon, delta, sample_rate, int(steps), accountant, sampling=sampling)
    return {"noise_multiplier": result.noise_multiplier, "epsilon": result.epsilon, "target_epsilon": epsilon,
            "delta": delta, "sample_rate": sample_rate, "steps": int(steps), "accountant": accountant,
            "sampling": sampling}
