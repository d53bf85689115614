"""Pure privacy math (``fedsim.privacy.analysis``): conversions, exact Gaussian, sampled-Gaussian RDP."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.errors import ConfigError
from fedsim.privacy.analysis import (
    bun_steinke_epsilon,
    gaussian_epsilon_exact,
    poisson_gaussian_rdp,
    quiet_absl,
    zcdp_to_epsilon,
)


def test_spec_conversions_7_1():
    # The accountants' side of the same table is in test_accountants.py::test_spec_conversions_7_1_accountants.
    assert bun_steinke_epsilon(0.5, 1e-5) == pytest.approx(5.2985, abs=1e-4)
    assert zcdp_to_epsilon(0.5, 1e-5) == pytest.approx(4.7284, abs=1e-4)
    assert gaussian_epsilon_exact(1.0, 1e-5) == pytest.approx(4.3772, abs=1e-4)
    assert gaussian_epsilon_exact(0.5, 1e-5) == pytest.approx(1.9931, abs=1e-4)
    assert gaussian_epsilon_exact(2.0, 1e-5) == pytest.approx(9.9973, abs=1e-4)


def test_conversion_edge_cases():
    assert zcdp_to_epsilon(0.0, 1e-5) == 0.0
    assert zcdp_to_epsilon(math.inf, 1e-5) == math.inf
    assert gaussian_epsilon_exact(0.0, 1e-5) == 0.0
    with pytest.raises(ConfigError):
        zcdp_to_epsilon(0.5, 1.0)


def test_fractional_order_rdp_against_high_precision_integral():
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30
    q, sigma, alpha = 0.65, 1.73, 1.1  # dp_accounting 0.6 drops this order (series does not converge)
    f = lambda x: mp.npdf(x, 0, sigma) * ((1 - q) + q * mp.exp((2 * x - 1) / (2 * sigma**2))) ** alpha
    exact = float(mp.log(mp.quad(f, [-mp.inf, 0, alpha, mp.inf]))) / (alpha - 1)
    assert poisson_gaussian_rdp(q, sigma, (alpha,))[0] == pytest.approx(exact, rel=1e-8)


def test_poisson_gaussian_rdp_is_read_only_and_full_rate_is_gaussian():
    rdp = poisson_gaussian_rdp(1.0, 2.0, (1.5, 2.0, 8.0))
    assert not rdp.flags.writeable  # cached: callers must not mutate it
    np.testing.assert_allclose(rdp, np.array([1.5, 2.0, 8.0]) / (2 * 2.0**2), rtol=1e-12)  # α/(2σ²)
    assert np.all(poisson_gaussian_rdp(0.0, 2.0, (1.5, 2.0)) == 0.0)


def test_quiet_absl_restores_level():
    logger = logging.getLogger("absl")
    old = logger.level
    with quiet_absl():
        assert logger.level == logging.ERROR
    assert logger.level == old


@settings(max_examples=30, deadline=None)
@given(rho=st.floats(1e-4, 50.0), log_delta=st.floats(-12, -2))
def test_cks_conversion_is_tighter_than_bun_steinke_and_valid(rho, log_delta):
    delta = 10**log_delta
    cks = zcdp_to_epsilon(rho, delta)
    assert cks <= bun_steinke_epsilon(rho, delta) + 1e-12
    # never below the exact epsilon of the Gaussian that is rho-zCDP
    assert cks >= gaussian_epsilon_exact(math.sqrt(2 * rho), delta) - 1e-6
    grid = np.array([1 + x / 10 for x in range(1, 2000)])
    on_grid = np.min(grid * rho + np.log1p(-1 / grid) - (np.log(delta) + np.log(grid)) / (grid - 1))
    assert cks <= max(on_grid, 0.0) + 1e-9
