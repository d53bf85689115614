"""Smoke tests of every CLI command, run as a user would (a subprocess), plus exit codes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


# ------------------------------------------------------- issue 9: honest endings, run dirs, resume
def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


LONG = 60  # rounds: the signal comes after round 2, long before the end
SMALL = ["--set", "data.num_clients=4", "--set", "client.max_steps=2", "--set", "strategy.min_train_clients=2"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_with_130_and_an_interrupted_summary(sig, tmp_path):
    from fedsim.results import read_jsonl

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", "scenarios/default.toml", *SMALL,
                             "--set", f"run.rounds={LONG}", "--out", str(out)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    deadline = time.monotonic() + 240
    metrics = out / "metrics.jsonl"
    while not metrics.exists() or metrics.read_text().count("\n") < 3:      # rounds 0, 1, 2 written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1 and sig.name in said[0] and f"fedsim resume {out}" in said[0], err
    assert "Traceback" not in err
    summary = _summary(out)
    done = summary["rounds_completed"]
    assert summary["status"] == "interrupted" and summary["error"] == sig.name and 2 <= done < LONG
    assert read_jsonl(out / "metrics.jsonl")[-1]["round"] == done


def _stop_at(at):
    def on_round(rnd, row):
        if rnd == at:
            raise KeyboardInterrupt("SIGTERM")
    return on_round


@pytest.mark.slow
def test_resume_continues_to_the_uninterrupted_model(tmp_path):
    from fedsim.catalog import resolve
    from fedsim.config import load_scenario
    from fedsim.engines.local import run_local
    from fedsim.results import load_checkpoint, read_jsonl
    from tests.conftest import tiny

    out, full = tmp_path / "run", tmp_path / "full"
    with pytest.raises(KeyboardInterrupt):
        run_local(tiny(["run.rounds=4"]), out, on_round=_stop_at(2))
    cfg = out / "config.toml"
    original = cfg.read_text()
    cfg.write_text(original.replace("rounds = 4", "rounds = 6"))
    p = fedsim("resume", str(out), check=False)
    assert p.returncode == 12 and "different scenario" in p.stderr, p.stderr     # config.toml changed: refused
    cfg.write_text(original)
    resumed = json.loads(fedsim("resume", str(out), "--format", "json").stdout)
    assert resumed["status"] == "completed" and resumed["resumed_from"] == 2 and resumed["rounds_completed"] == 4
    run_local(resolve(load_scenario(cfg)), full)
    a = load_checkpoint(out / "checkpoints" / "round_0004.npz")["model"]
    b = load_checkpoint(full / "checkpoints" / "round_0004.npz")["model"]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_failed_rounds_exit_non_zero_unless_continue_is_asked(tmp_path):
    crash = ["--set", "faults.crash_clients=[0, 1, 2, 3]", "--set", "run.rounds=2"]
    p = fedsim("run", "scenarios/default.toml", *SMALL, *crash, "--out", str(tmp_path / "a"), check=False)
    assert p.returncode == 10 and "FailedRoundError" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert _summary(tmp_path / "a")["status"] == "stopped: FailedRoundError"
    p = fedsim("run", "scenarios/default.toml", *SMALL, *crash, "--set", 'run.on_failed_round="continue"',
               "--out", str(tmp_path / "b"), "--format", "json", check=False)
    assert p.returncode == 10 and "every one of the 2 rounds failed" in p.stderr, p.stderr  # trained nothing
    summary = _summary(tmp_path / "b")
    assert summary["status"] == "failed: every round failed" and summary["failed_rounds"] == [1, 2]


def test_out_is_refused_when_not_empty_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    fedsim("run", "scenarios/default.toml", *SMALL, "--set", "run.rounds=2", "--out", str(out))
    p = fedsim("run", "scenarios/default.toml", *SMALL, "--set", "run.rounds=1", "--out", str(out), check=False)
    assert p.returncode == 11 and "not empty" in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert _summary(out)["rounds_completed"] == 2                              # untouched
    fedsim("run", "scenarios/default.toml", *SMALL, "--set", "run.rounds=1", "--out", str(out), "--overwrite")
    assert sorted(f.name for f in (out / "checkpoints").iterdir()) == ["latest.json", "round_0001.npz"]
    assert _summary(out)["rounds_completed"] == 1


def test_resume_refuses_other_engines_and_non_run_directories(tmp_path):
    from fedsim.engines.local import run_local
    from tests.conftest import tiny

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_local(tiny(["run.rounds=3"]), out, on_round=_stop_at(1))
    cfg = out / "config.toml"
    cfg.write_text(cfg.read_text().replace('engine = "local"', 'engine = "ray"', 1))
    p = fedsim("resume", str(out), check=False)
    assert p.returncode == 2 and "local engine" in p.stderr, p.stderr
    p = fedsim("resume", str(tmp_path), check=False)
    assert p.returncode == 1 and "config.toml" in p.stderr


# ------------------------------------------------- issue 14 §7, §9: version, help, formats, progress
def test_version_names_fedsim_flower_and_torch():
    from importlib.metadata import version

    import fedsim as package

    line = fedsim("--version").stdout.strip()
    assert line.startswith(f"fedsim {package.__version__} (flwr {version('flwr')}, torch {version('torch')}")


def test_help_shows_the_arguments_help():
    env_wide = {**os.environ, "COLUMNS": "200"}
    for args, text in ((["run"], "scenario TOML file (or the name of a built-in one)"),
                       (["resume"], "a run directory written by `fedsim run` (local engine)"),
                       (["privacy", "utility"], "run directories of private runs")):
        p = subprocess.run([sys.executable, "-m", "fedsim.cli", *args, "--help"], capture_output=True, text=True,
                           cwd=ROOT, env=env_wide, timeout=120)
        assert p.returncode == 0 and text in p.stdout, p.stdout
    assert "--version" in fedsim("--help").stdout


@pytest.mark.parametrize("args", [["list"], ["run", "scenarios/default.toml"],
                                  ["privacy", "epsilon", "--noise", "1", "--sample-rate", "0.1", "--steps", "3"]])
def test_an_unknown_format_is_refused_naming_the_option_and_the_choices(args):
    p = fedsim(*args, "--format", "yaml", check=False)
    assert p.returncode == 2, p.stderr
    assert "ConfigError" in p.stderr and "--format" in p.stderr and "'yaml'" in p.stderr and "text, json" in p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr


ROUND_LINE = r"^round (\d+)/2  accuracy [0-9.]+  loss [0-9.]+  [0-9.]+ s$"


@pytest.mark.slow
def test_progress_off_a_terminal_is_one_line_per_round(tmp_path):
    """(``--quiet`` printing none of it is checked by tests/test_imports.py's quiet run.)"""
    import re

    p = fedsim("run", "scenarios/default.toml", *SMALL, "--set", "run.rounds=2", "--out", str(tmp_path / "a"))
    lines = p.stderr.splitlines()
    assert [re.match(ROUND_LINE, x).group(1) for x in lines if x.startswith("round ")] == ["1", "2"], p.stderr
    assert all(re.match(ROUND_LINE, x) for x in lines if x.startswith("round ")), p.stderr
    status = [x for x in lines if x.startswith("fedsim: ")]                   # said before round 1 ran
    assert "building the federation (digits, 4 clients" in p.stderr and "training round 1 of 2" in status[-1]
    assert lines.index(status[-1]) < lines.index(next(x for x in lines if x.startswith("round 1/2")))


def test_run_client_app_names_the_clients_app_or_is_refused_naming_the_key(tmp_path):
    """``--client-app module:object`` sets ``run.client_app``: the vanilla app serves (summary says so); a name
    that does not load exits with the ConfigError's code before the run, naming the key."""
    named = "tests.fedsim.engines.vanilla_app:named_app"
    p = fedsim("run", "scenarios/default.toml", "--set", "run.rounds=1", "--set", "model.hidden=[16]",
               "--client-app", named, "--out", str(tmp_path / "ok"), "--format", "json")
    summary = json.loads(p.stdout)
    assert summary["status"] == "completed" and summary["client_app"] == named
    assert "not fedsim's" in summary["vectorized"]["reason"]
    bad = fedsim("run", "scenarios/default.toml", "--client-app", "tests.fedsim.engines.vanilla_app:nope",
                 "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and "run.client_app" in bad.stderr and "has no object 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
