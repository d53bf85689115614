"""Noise multipliers outside what an accountant can account are refused with a typed error, never a
traceback, a division by zero or a machine out of memory (``fedsim.privacy.bounds``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.config import scenario_from_dict
from fedsim.errors import ConfigError
from fedsim.privacy.accountants import make_accountant
from fedsim.privacy.bounds import MAX_NOISE, MIN_NOISE, PLD_MIN_NOISE
from fedsim.privacy.calibration import calibrate_noise_multiplier, noise_floor
from fedsim.privacy.commands import epsilon
from fedsim.privacy.events import GaussianEvent, PoissonGaussianEvent, ZCDPEvent
from tests.conftest import TINY


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsim.cli", "privacy", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("noise", [1e-300, 1e-4, 2e6, 1e308])
def test_epsilon_refuses_noise_the_accountants_cannot_take(noise):
    with pytest.raises(ConfigError) as err:
        epsilon(noise, 0.01, 100, 1e-5, "rdp")
    assert err.value.key == "noise" and "--noise 0" in err.value.hint


def test_the_cli_says_so_without_a_traceback_and_prints_infinity_for_no_noise():
    bad = cli("epsilon", "--noise", "1e-300", "--sample-rate", "0.01", "--steps", "100")
    assert bad.returncode == 2 and "error (ConfigError): noise:" in bad.stderr and "Traceback" not in bad.stderr
    none = cli("epsilon", "--noise", "0", "--sample-rate", "0.01", "--steps", "100")
    assert none.returncode == 0 and "ε = ∞ (no noise)" in none.stdout


@settings(max_examples=25, deadline=None)
@given(z=st.floats(min_value=1e-6, max_value=0.999 * PLD_MIN_NOISE))  # (a zCDP ρ round-trips σ only to ~1 ulp)
def test_pld_refuses_small_noise_before_building_its_grid(z):
    for event in (PoissonGaussianEvent(z, 0.01), GaussianEvent(z), ZCDPEvent(1.0 / (2 * z * z))):
        acc = make_accountant("pld")
        with pytest.raises(ConfigError, match="PLD accountant's loss grid") as err:
            acc.compose(event, 100)
        assert err.value.key == "privacy.accountant" and "'rdp'" in err.value.hint


def test_pld_still_accounts_at_its_floor_and_no_noise():
    acc = make_accountant("pld")
    acc.compose(PoissonGaussianEvent(PLD_MIN_NOISE, 0.01), 100)
    assert 0 < acc.epsilon(1e-5) < 1e3
    assert make_accountant("rdp").min_noise == MIN_NOISE and noise_floor("pld") == PLD_MIN_NOISE


def test_calibrating_pld_to_a_large_epsilon_stops_at_its_floor_and_never_overshoots():
    found = calibrate_noise_multiplier(500.0, 1e-5, 0.01, 1000, "pld")
    assert found.noise_multiplier == PLD_MIN_NOISE and found.epsilon <= 500.0


def test_a_scenario_asking_pld_for_tiny_noise_is_refused_before_the_run():
    raw = {**TINY, "privacy": {"mechanism": "dp-sgd", "noise_multiplier": 0.1, "accountant": "pld"}}
    with pytest.raises(ConfigError) as err:
        scenario_from_dict(raw)
    assert err.value.key == "privacy.noise_multiplier" and "rdp" in err.value.hint
    raw["privacy"]["accountant"] = "rdp"
    assert scenario_from_dict(raw).privacy.noise_multiplier == 0.1
    assert MAX_NOISE > PLD_MIN_NOISE > MIN_NOISE
