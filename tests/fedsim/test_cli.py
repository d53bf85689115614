"""Smoke tests of every CLI command, run as a user would (a subprocess), plus exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def fedsim(*args, check=True):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_run_json_and_plot(tmp_path):
    out = tmp_path / "run"
    p = fedsim("run", "scenarios/default.toml", "--set", "run.rounds=2", "--seed", "5", "--out", str(out),
               "--format", "json")
    summary = json.loads(p.stdout)
    assert summary["status"] == "completed" and summary["seed"] == 5
    for f in ("config.toml", "metrics.jsonl", "metrics.csv", "clients.jsonl", "summary.json"):
        assert (out / f).exists()
    (out / "plots" / "accuracy.png").unlink()
    fedsim("plot", str(out))
    assert (out / "plots" / "accuracy.png").exists()
    # the resolved config re-runs as a scenario
    again = json.loads(fedsim("run", str(out / "config.toml"), "--out", str(tmp_path / "again"),
                              "--format", "json").stdout)
    assert again["final"]["test_loss"] == pytest.approx(summary["final"]["test_loss"], abs=1e-9)


def test_list_json():
    data = json.loads(fedsim("list", "--format", "json").stdout)
    for kind in ("strategies", "plugins", "partitioners", "datasets", "models", "scenarios"):
        assert data[kind], kind
    assert "default.toml" in data["scenarios"] and "fedavg" in data["strategies"]


def test_partition_plot(tmp_path):
    png = tmp_path / "p.png"
    p = fedsim("partition", "scenarios/default.toml", "--plot", "--out", str(png), "--format", "json")
    counts = json.loads(p.stdout)["counts"]
    assert len(counts) == 10 and png.stat().st_size > 1000


@pytest.mark.parametrize("args, code, words", [
    (["--set", "run.bogus=1"], 2, ["run.bogus", "unknown key"]),
    (["--set", "run.rounds=abc"], 2, ["run.rounds"]),
    (["--set", "strategy.name=nope"], 2, ["strategy.name", "fedavg"]),
    (["--set", "data.num_clients=5000"], 3, ["data.num_clients"]),
    (["--set", "data.partition.alpha=-1"], 2, ["data.partition.alpha"]),
])
def test_bad_scenarios_exit_non_zero_with_the_key(args, code, words, tmp_path):
    p = fedsim("run", "scenarios/default.toml", *args, "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == code, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert "hint" in p.stderr


def test_missing_scenario_file():
    p = fedsim("run", "nope.toml", check=False)
    assert p.returncode == 2 and "not found" in p.stderr
