"""The privacy ledger in real runs: ε per round, budget refusal before a round, checkpoints."""

import json

import numpy as np
import pytest

from fedsim.engines.local import run_local
from fedsim.errors import PrivacyBudgetExceeded
from fedsim.privacy.accountants import make_accountant
from fedsim.privacy.events import PoissonGaussianEvent
from fedsim.results import load_checkpoint, read_jsonl
from tests.conftest import tiny

DPFEDAVG = ['strategy.name="dp_fedavg"', 'privacy.mechanism="dp-fedavg"', "privacy.noise_multiplier=1.0",
            "strategy.fraction_train=0.5", "privacy.release_counters=false"]


def test_epsilon_per_round_matches_an_independent_accountant(tmp_path):
    run_local(tiny([*DPFEDAVG, "run.rounds=3"]), tmp_path)
    recs = [r for r in read_jsonl(tmp_path / "privacy.jsonl") if r["mechanism"] == "dp-fedavg"]
    acc = make_accountant("rdp")
    for r in recs:
        acc.compose(PoissonGaussianEvent(1.0, 0.5), 1)
        assert r["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-9)
    eps = [r["epsilon"] for r in recs]
    assert eps == sorted(eps) and len(eps) == 3


def test_budget_stops_before_the_round_and_keeps_what_was_written(tmp_path):
    acc = make_accountant("rdp")
    acc.compose(PoissonGaussianEvent(1.0, 0.5), 2)
    budget = (acc.epsilon(1e-5) + acc.epsilon_if(PoissonGaussianEvent(1.0, 0.5), 1, 1e-5)) / 2  # between 2 and 3
    s = tiny([*DPFEDAVG, "run.rounds=5", f"privacy.max_epsilon={budget}"])
    with pytest.raises(PrivacyBudgetExceeded, match="round 3"):
        run_local(s, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "stopped: PrivacyBudgetExceeded" and summary["rounds_completed"] == 2
    ck = load_checkpoint(tmp_path / "checkpoints" / "round_0002.npz")
    assert ck["meta"]["privacy"]["dp-fedavg"]["events"][0]["count"] == 2
    assert all(np.isfinite(a).all() for a in ck["model"])
    assert max(r["epsilon"] for r in read_jsonl(tmp_path / "privacy.jsonl")) <= budget


def test_cli_exit_code_for_budget(tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "fedsim.cli", "run", "scenarios/default.toml", "--out", str(tmp_path / "r"),
            "--set", 'strategy.name="dp_fedavg"', "--set", 'privacy.mechanism="dp-fedavg"',
            "--set", "privacy.noise_multiplier=0.5", "--set", "privacy.max_epsilon=1.0"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 7, p.stderr
    assert "PrivacyBudgetExceeded" in p.stderr and "privacy.max_epsilon" in p.stderr


def test_participation_counter_is_released(tmp_path):
    s = tiny([*DPFEDAVG[:-1], "run.rounds=3", "privacy.counter_noise=0.001"])
    run_local(s, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")[1:]
    running = np.cumsum([r["num-clients"] for r in rows])
    released = [r["released/participation"] for r in rows]
    np.testing.assert_allclose(released, running, atol=0.1)
    mechs = {r["mechanism"] for r in read_jsonl(tmp_path / "privacy.jsonl")}
    assert mechs == {"dp-fedavg", "counter/participation", "counter/label_histogram", "total"}
    hist = rows[-1]["released/label_histogram"]
    assert len(hist) == 10 and sum(hist) == pytest.approx(sum(r["num-examples"] for r in rows), abs=1.0)
    assert all("label-counts" not in c for c in read_jsonl(tmp_path / "clients.jsonl"))
