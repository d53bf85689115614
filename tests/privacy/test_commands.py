"""CLI back-ends: JSON-able results with the documented keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.errors import ConfigError, UnknownNameError
from fedsim.privacy import commands


def test_epsilon_command():
    out = commands.epsilon(1.5, 0.04, 2250, 1e-5)
    assert json.loads(json.dumps(out))["epsilon"] == pytest.approx(7.32911117143, abs=1e-6)
    assert out["accountant"] == "rdp" and out["sampling"] == "poisson"
    fixed = commands.epsilon(2.0, 0.01, 100, 1e-5, sampling="fixed", population=1000)
    assert fixed["epsilon"] > commands.epsilon(2.0, 0.01, 100, 1e-5)["epsilon"]  # replace-one costs more
    assert commands.epsilon(0.0, 0.01, 10, 1e-5)["epsilon"] is None  # infinite -> null in JSON
    with pytest.raises(UnknownNameError):
        commands.epsilon(1.0, 0.01, 10, 1e-5, accountant="gdp")


@pytest.mark.parametrize("mechanism", ["tree", "honaker", "sqrt"])
def test_counter_variance_command(mechanism):
    out = commands.counter_variance(mechanism, 32, 0.5, 3000, seed=1)
    json.dumps(out)
    assert out["t"] == list(range(1, 33))
    assert len(out["measured_variance"]) == len(out["theoretical_variance"]) == 32
    measured, theory = np.array(out["measured_variance"]), np.array(out["theoretical_variance"])
    assert np.all(np.abs(measured / theory - 1) < 0.15)  # 3000 trials: SE ~ 2.6 %
    assert commands.counter_variance(mechanism, 32, 0.5, 300, seed=1) == \
        commands.counter_variance(mechanism, 32, 0.5, 300, seed=1)  # seeded


def test_counter_variance_chunks_large_runs(monkeypatch):
    monkeypatch.setattr(commands, "_MAX_CELLS", 64)
    out = commands.counter_variance("tree", 16, 1.0, 50, seed=0)
    assert len(out["measured_variance"]) == 16
    with pytest.raises(ConfigError):
        commands.counter_variance("tree", 0, 1.0, 50)


def test_calibrate_command():
    out = commands.calibrate(3.0, 1e-5, 0.01, 1000, "rdp")
    json.dumps(out)
    assert out["epsilon"] <= 3.0 and out["noise_multiplier"] > 0
    check = commands.epsilon(out["noise_multiplier"], 0.01, 1000, 1e-5)
    assert check["epsilon"] == pytest.approx(out["epsilon"])
