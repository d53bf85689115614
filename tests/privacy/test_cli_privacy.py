"""`fedsim privacy …` as a user runs it."""

import json
import subprocess
import sys

import pytest


def privacy(*args):
    p = subprocess.run([sys.executable, "-m", "fedsim.cli", "privacy", *args, "--format", "json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_epsilon_golden_value():
    r = privacy("epsilon", "--noise", "1.5", "--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5",
                "--accountant", "rdp")
    assert r["epsilon"] == pytest.approx(7.32911117143, abs=1e-3)
    pld = privacy("epsilon", "--noise", "1.5", "--sample-rate", "0.04", "--steps", "2249", "--delta", "1e-5",
                  "--accountant", "pld")
    assert pld["epsilon"] == pytest.approx(6.7774, rel=0.01)


def test_counter_lists_have_equal_length():
    r = privacy("counter", "--mechanism", "honaker", "--T", "16", "--rho", "1", "--trials", "300")
    assert len(r["t"]) == len(r["measured_variance"]) == len(r["theoretical_variance"]) == 16


def test_calibrate_never_overshoots():
    r = privacy("calibrate", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "500")
    assert r["epsilon"] <= 2 and r["noise_multiplier"] > 0
    check = privacy("epsilon", "--noise", str(r["noise_multiplier"]), "--sample-rate", "0.01", "--steps", "500")
    assert check["epsilon"] <= 2


def test_privacy_utility_plot(tmp_path):
    from fedsim.engines.local import run_local
    from fedsim.plots import plot_privacy_utility
    from tests.conftest import tiny

    dirs = []
    for z in (0.5, 2.0):
        d = tmp_path / f"z{z}"
        run_local(tiny(['strategy.name="dp_fedavg"', 'privacy.mechanism="dp-fedavg"',
                        f"privacy.noise_multiplier={z}"]), d)
        dirs.append(d)
    out = plot_privacy_utility(dirs, tmp_path / "pu.png")
    assert out.stat().st_size > 1000
