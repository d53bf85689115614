"""Ray engine (Flower's Simulation Engine): same scenario and seed give the local engine's metrics."""

import pytest

from fedsim.results import read_jsonl
from tests.conftest import tiny

pytestmark = pytest.mark.slow


def test_ray_matches_local(tmp_path):
    pytest.importorskip("ray")
    from fedsim.engines.local import run_local
    from fedsim.engines.ray import run_ray

    s = tiny(["run.rounds=2", "faults.crash_clients=[2]", "faults.crash_rounds=[2]"])
    local = run_local(s, tmp_path / "local")
    ray = run_ray(s, tmp_path / "ray")
    assert ray["status"] == "completed"
    for key in ("test_loss", "test_accuracy", "train_loss"):
        assert ray["final"][key] == pytest.approx(local["final"][key], abs=1e-6), key
    rows_l = read_jsonl(tmp_path / "local" / "metrics.jsonl")
    rows_r = read_jsonl(tmp_path / "ray" / "metrics.jsonl")
    assert [r["test_loss"] for r in rows_l] == pytest.approx([r["test_loss"] for r in rows_r], abs=1e-6)
    bad = [c for c in read_jsonl(tmp_path / "ray" / "clients.jsonl") if c["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["client"] == 2 and bad[0]["round"] == 2


@pytest.mark.parametrize("name, extra", [
    ("fedld", []),
    ("semifl", ["data.server_labelled=40", "strategy.tau=0.0", "strategy.server_epochs=1"]),
    ("signsgd", ["strategy.b=0.03"]),
    ("dp_fedavg", ['privacy.mechanism="dp-fedavg"', "privacy.noise_multiplier=0.5"]),
])
def test_core_strategies_run_on_ray_like_local(name, extra, tmp_path):
    """The published methods run unchanged on Flower's Simulation Engine, with the local engine's metrics."""
    pytest.importorskip("ray")
    from fedsim.engines.local import run_local
    from fedsim.engines.ray import run_ray

    s = tiny(["run.rounds=1", f'strategy.name="{name}"', *extra])
    local = run_local(s, tmp_path / "local")
    ray = run_ray(s, tmp_path / "ray")
    assert ray["status"] == "completed"
    assert ray["final"]["test_loss"] == pytest.approx(local["final"]["test_loss"], abs=1e-6)
