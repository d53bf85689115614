"""Pure privacy math used by the accountants: zCDP → (ε, δ) conversions, the exact Gaussian ε,
and the RDP of the Poisson-subsampled Gaussian (fractional orders by quadrature). No bookkeeping here:
the ledgers live in :mod:`fedsim.privacy.accountants`, the events in :mod:`fedsim.privacy.events`.

References
----------
Bun, Steinke, "Concentrated Differential Privacy", TCC 2016, Prop. 1.3.
Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020, Prop. 12.
Balle, Wang, "Improving the Gaussian Mechanism for Differential Privacy", ICML 2018 (exact Gaussian).
Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator

import numpy as np

from fedsim.errors import ConfigError
from fedsim.privacy.events import PoissonGaussianEvent, to_dp_event

__all__ = [
    "bun_steinke_epsilon",
    "gaussian_epsilon_exact",
    "poisson_gaussian_rdp",
    "quiet_absl",
    "zcdp_to_epsilon",
]


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """Silence absl warnings below ERROR for the duration of the block.

    dp_accounting logs a warning for every fractional order whose series fails to converge (it then
    excludes that order, which only makes ε larger, i.e. safe). Keep those out of run logs.
    """
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def bun_steinke_epsilon(rho: float, delta: float) -> float:
    """ε = ρ + 2·sqrt(ρ·ln(1/δ)) for ρ-zCDP (Bun & Steinke 2016, Prop. 1.3); looser than CKS."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def _cks_objective(alpha: float, rho: float, delta: float) -> float:
    # RDP ε(α) = αρ, converted with ln((α−1)/α) − (ln δ + ln α)/(α−1)  (CKS 2020, Prop. 12).
    return alpha * rho + math.log1p(-1.0 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1.0)


def zcdp_to_epsilon(rho: float, delta: float) -> float:
    """Tight ρ-zCDP → (ε, δ) conversion, minimised over a continuous Rényi order α > 1.

    Uses ε = min_α [αρ + ln((α−1)/α) − (ln δ + ln α)/(α−1)] (Canonne, Kamath, Steinke 2020,
    Prop. 12; also Asoodeh et al. 2020). The value returned is the objective evaluated at the
    minimiser found, i.e. at one valid α, so it is always a valid bound. It never exceeds
    :func:`bun_steinke_epsilon`.

    Examples
    --------
    >>> round(zcdp_to_epsilon(0.5, 1e-5), 4)
    4.7284
    """
    if not 0 < delta < 1:
        raise ConfigError("delta", f"must lie in (0, 1), got {delta}", "a typical δ is 1e-5 or 1/n^1.1")
    if rho <= 0:
        return 0.0
    if math.isinf(rho):
        return math.inf
    # Search x = ln(α − 1); the Bun–Steinke optimum α = 1 + sqrt(ln(1/δ)/ρ) is a good centre.
    from scipy import optimize

    centre = 0.5 * math.log(math.log(1.0 / delta) / rho)
    res = optimize.minimize_scalar(lambda x: _cks_objective(1.0 + math.exp(x), rho, delta),
                                   bounds=(centre - 12.0, centre + 12.0), method="bounded",
                                   options={"xatol": 1e-10})
    return max(0.0, min(float(res.fun), bun_steinke_epsilon(rho, delta)))


def gaussian_epsilon_exact(mu: float, delta: float) -> float:
    """Exact ε(δ) of one Gaussian mechanism with μ = Δ/σ (Balle & Wang 2018), via dp_accounting.

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2).
    """
    if mu <= 0:
        return 0.0
    import dp_accounting

    return float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta))


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_α of the Poisson-subsampled Gaussian, for many orders, by adaptive quadrature.

    A_α = E_{x~N(0,σ²)}[((1 − q) + q·exp((2x − 1)/(2σ²)))^α] (Mironov, Talwar, Zhang 2019, §3);
    the RDP at order α is log(A_α)/(α − 1). Writing the integrand as exp(g_α(x)), g_α(x) ≤ g_α(0) −
    x²/(2σ²) for x < 0 and g_α(x) ≤ g_α(α) − (x − α)²/(2σ²) for x > α, so [−σ√120, α + σ√120] holds
    all but e^(−60) of the mass. Each order is scaled by its maximum (found on a grid) before
    ``scipy.integrate.quad_vec`` integrates all orders at once.
    """
    from scipy import integrate

    s2 = sigma * sigma
    log_q, log_1mq = math.log(q), math.log1p(-q)
    alphas = np.asarray(alphas, dtype=np.float64)
    top_alpha = float(alphas.max())

    def log_g(x: np.ndarray) -> np.ndarray:  # shape (orders, len(x))
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        return -(x[None, :] ** 2) / (2.0 * s2) + alphas[:, None] * np.logaddexp(
            log_1mq, log_q + (2.0 * x[None, :] - 1.0) / (2.0 * s2))

    top = log_g(np.linspace(-1.0, top_alpha + 1.0, 2001)).max(axis=1)
    reach = sigma * math.sqrt(120.0)
    # The mixture weight switches from 1 − q to q·e^(...) around z0 = σ² ln(1/q − 1) + 1/2, over a
    # width of about σ²: break there too, which matters when σ is small.
    z0 = s2 * (log_1mq - log_q) + 0.5
    breaks = sorted({*np.linspace(0.0, top_alpha, 12), *(z0 + s2 * np.arange(-8.0, 9.0))})
    breaks = [b for b in breaks if -reach < b < top_alpha + reach]
    value, _ = integrate.quad_vec(lambda x: np.exp(log_g(x)[:, 0] - top), -reach, top_alpha + reach,
                                  epsrel=1e-12, points=breaks, limit=2000)
    return top + np.log(value) - 0.5 * math.log(2.0 * math.pi * s2)


@functools.lru_cache(maxsize=4096)
def poisson_gaussian_rdp(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP ε(α) of one Poisson-subsampled Gaussian step at each order (add/remove neighbours).

    Integer orders come from dp_accounting's exact binomial expansion. For fractional orders
    dp_accounting 0.6 sums |terms| of a slowly converging series and drops the orders where 1000
    terms do not converge (typically α < 2 with q ≳ 0.05); both are safe but loose, by up to 20 %
    in ε at large q. Fractional orders are therefore computed by :func:`_log_a_fractional`
    (checked against a 40-digit mpmath integral and Opacus's signed series: ≤ 1e-7 relative),
    except for σ < 0.1, where dp_accounting's series converges fast and is kept.

    Parameters
    ----------
    sample_rate : float
        Poisson inclusion probability q, in [0, 1].
    noise_multiplier : float
        σ, the noise std over the ℓ2 sensitivity.
    orders : tuple of float
        Rényi orders α > 1 (a tuple, so that results can be cached).

    Returns
    -------
    numpy.ndarray
        Read-only array of the RDP at each order, in the order given.
    """
    alphas = np.asarray(orders, dtype=np.float64)
    frac = alphas != np.floor(alphas)
    # Below σ = 0.1 dp_accounting's series converges in a few terms (and matches Opacus to 1e-10)
    # while the integrand gets too peaked for quick quadrature: keep dp_accounting there.
    exact = ~frac | (sample_rate in (0.0, 1.0)) | (noise_multiplier < 0.1)
    rdp = np.zeros(len(alphas))
    if exact.any():
        from dp_accounting import rdp as dp_rdp

        acc = dp_rdp.RdpAccountant(orders=list(alphas[exact]))
        with quiet_absl():
            acc.compose(to_dp_event(PoissonGaussianEvent(noise_multiplier, sample_rate)))
        rdp[exact] = acc.rdp
    if (~exact).any():
        rdp[~exact] = _log_a_fractional(sample_rate, noise_multiplier, alphas[~exact]) / (alphas[~exact] - 1.0)
    rdp.setflags(write=False)
    return rdp
