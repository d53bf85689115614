"""``fedsim sweep`` / ``fedsim compare`` (fedsim/experiments.py): grid parsing, resumable sweeps, grouping
over seeds, and the acceptance check: a sweep plus a compare give bench/compare_signsgd.py's numbers."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from fedsim.config import dumps_scenario
from fedsim.engines.local import run_local
from fedsim.errors import ConfigError, RunDirectoryError
from fedsim.experiments import (collect_runs, compare, existing_action, metric_value, parse_grid, parse_seeds,
                                plan_sweep, run_dir_name, split_values, table)
from fedsim.experiments_cli import sweep
from fedsim.experiments_plot import curve, draw_comparison
from fedsim.results import read_jsonl
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def test_grid_values_tables_and_refusals():
    assert split_values('1, [2, 3],{a=1, b="x,y"}') == ["1", "[2, 3]", '{a=1, b="x,y"}']
    grid = parse_grid(["client.lr=0.01,0.1", 'strategy={name="fedprox",mu=0.1},{name="fedavg"}'])
    assert grid[0] == [(("client.lr", 0.01),), (("client.lr", 0.1),)]
    assert grid[1] == [(("strategy.name", "fedprox"), ("strategy.mu", 0.1)), (("strategy.name", "fedavg"),)]
    for bad, words in [(["client.lr"], "key=value"), (["client.lr=0.1,"], "empty value"),
                       (["run.seed=1,2"], "--seeds"), (["client.lr=1,2", "client={lr=3}"], "two entries"),
                       (["client.lr=1,1"], "twice"), (["client=1,2"], "section"),
                       (["strategy={name=fedavg}"], "quote the strings")]:
        with pytest.raises(ConfigError, match=words):
            parse_grid(bad)
    assert parse_seeds("0, 2,1") == [0, 2, 1]
    for bad in ("a", "0,0", "-1"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def test_run_dir_names_are_path_safe_and_bounded():
    name = run_dir_name((("data.options.path", "../x/y"), ("client.plugins", ["a", "b"])), 3)
    assert "/" not in name and name.endswith("-s3") and not name.startswith(".")
    long = run_dir_name((("strategy.name", "x" * 300),), 0)
    assert len(long) < 140 and long != run_dir_name((("strategy.name", "x" * 299 + "y"),), 0)


def _scenario_file(tmp_path, **run):
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps({**TINY, "run": {**TINY["run"], **run}}))
    return str(path)


def _fake_run(path, config, seed, status, accs):
    path.mkdir(parents=True)
    cfg = json.loads(json.dumps(config))
    cfg["run"] = {**cfg["run"], "seed": seed}
    (path / "config.toml").write_text(tomli_w.dumps({**cfg, "meta": {"seed": seed}}))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"round": i, "test_accuracy": a}) + "\n"
                                                for i, a in enumerate(accs)))
    (path / "summary.json").write_text(json.dumps({"status": status}))


def test_compare_groups_by_everything_but_the_seed(tmp_path):
    lr1 = {**TINY, "client": {**TINY["client"], "lr": 0.1}}
    lr2 = {**TINY, "client": {**TINY["client"], "lr": 0.2}}
    _fake_run(tmp_path / "a0", lr1, 0, "completed", [0.1, 0.5, 0.7])
    _fake_run(tmp_path / "a1", {**lr1, "client": {**lr1["client"], "momentum": 0.0}}, 1, "completed",
              [0.1, 0.6, 0.5])  # states a default the other run leaves out: the same setting
    _fake_run(tmp_path / "a1-again", lr1, 1, "completed", [0.1, 0.6, 0.5])
    _fake_run(tmp_path / "b0", lr2, 0, "completed", [0.1, 0.8, 0.9])
    _fake_run(tmp_path / "b1", lr2, 1, "interrupted", [0.1])
    records, _ = collect_runs([tmp_path])
    groups, notes = compare(records, ["test_accuracy"], "last")
    assert [g.label for g in groups] == ["client.lr=0.1", "client.lr=0.2"]
    assert groups[0].values["test_accuracy"] == [0.7, 0.5] and [r.seed for r in groups[0].runs] == [0, 1]
    assert groups[0].stats("test_accuracy") == (pytest.approx(0.6), pytest.approx(statistics.stdev([0.7, 0.5])))
    assert groups[1].stats("test_accuracy") == (0.9, None)
    assert any("b1" in n and "interrupted" in n for n in notes) and any("a1-again" in n for n in notes)
    assert "| client.lr=0.1 | 0,1 | 0.6000 ± 0.1414 |" in table(groups, ["test_accuracy"], "last")
    assert compare(records, ["test_accuracy"], "max")[0][0].values["test_accuracy"] == [0.7, 0.6]
    assert compare(records, ["test_accuracy"], "1")[0][0].values["test_accuracy"] == [0.5, 0.6]
    with pytest.raises(ConfigError, match="test_loss"):
        compare(records, ["test_loss"], "last")
    with pytest.raises(ConfigError, match="--round"):
        compare(records, ["test_accuracy"], "7")
    rounds, means, stds = curve(groups[0].runs, "test_accuracy")
    assert rounds == [0, 1, 2] and means[2] == pytest.approx(0.6) and stds[0] == 0.0
    ax = draw_comparison(groups, ["test_accuracy"], "tiny").axes[0]
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # a mean curve and a ± std band per setting
    assert metric_value([{"round": 0}, {"round": 1, "x": 2.0}], "x", "min") == 2.0


def test_existing_directories_skip_resume_rerun_or_refuse(tmp_path):
    scenario = _scenario_file(tmp_path)
    out = tmp_path / "sweep"
    (run,) = plan_sweep(scenario, parse_grid(["client.lr=0.2"]), [0], [], out)
    assert run.action == "new" and run.dir.name == "client.lr-0.2-s0"
    run.dir.mkdir(parents=True)
    (run.dir / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not a fedsim run"):
        existing_action(run)
    (run.dir / "notes.txt").unlink()
    (run.dir / "config.toml").write_text(dumps_scenario(run.scenario))
    assert existing_action(run) == "rerun"  # no summary, no checkpoint: run it again
    (run.dir / "checkpoints").mkdir()
    (run.dir / "checkpoints" / "latest.json").write_text("{}")
    assert existing_action(run) == "resume"
    for status, action in (("interrupted", "resume"), ("stopped: FailedRoundError", "rerun"), ("completed", "skip")):
        (run.dir / "summary.json").write_text(json.dumps({"status": status}))
        assert existing_action(run) == action, status
    with pytest.raises(RunDirectoryError, match="run.rounds: 2 there, 3 planned"):  # refused when planned
        plan_sweep(scenario, parse_grid(["client.lr=0.2"]), [0], ["run.rounds=3"], out)


@pytest.mark.slow  # end to end: four tiny runs, one interrupted and resumed by the sweep
def test_sweep_resumes_an_interrupted_run_and_skips_completed_ones(tmp_path, capsys):
    scenario = _scenario_file(tmp_path, rounds=3)
    out = tmp_path / "sweep"
    plan = plan_sweep(scenario, parse_grid(["client.lr=0.1,0.2"]), [0], [], out)
    victim = plan[1]
    def stop_after_round_2(rnd, row):
        if rnd == 2:
            raise KeyboardInterrupt("test")

    with pytest.raises(KeyboardInterrupt):  # a sweep killed during its second run, after round 2
        run_local(victim.scenario, victim.dir, on_round=stop_after_round_2)
    sweep(scenario, grid=["client.lr=0.1,0.2"], seeds="0", out=out, quiet=False)
    err = capsys.readouterr().err
    assert "2 to run (1 resumed, 0 redone)" in err
    assert json.loads((victim.dir / "summary.json").read_text())["resumed_from"] == 2
    run_local(victim.scenario, tmp_path / "straight")  # the same run, uninterrupted
    assert read_jsonl(victim.dir / "metrics.jsonl")[-1]["test_loss"] == read_jsonl(
        tmp_path / "straight" / "metrics.jsonl")[-1]["test_loss"]
    index = json.loads((out / "sweep.json").read_text())
    assert [(r["setting"], r["status"]) for r in index["runs"]] == [({"client.lr": 0.1}, "completed"),
                                                                     ({"client.lr": 0.2}, "completed")]
    mtime = (plan[0].dir / "summary.json").stat().st_mtime_ns
    sweep(scenario, grid=["client.lr=0.1,0.2"], seeds="0", out=out, quiet=False)
    assert "2 completed before, 0 to run" in capsys.readouterr().err
    assert (plan[0].dir / "summary.json").stat().st_mtime_ns == mtime


def _fedsim(*args):
    """``fedsim ARGS`` in this process (Typer's test runner): its stdout."""
    from typer.testing import CliRunner

    from fedsim.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


@pytest.mark.slow  # end to end: 8 runs (4 through `fedsim sweep --jobs 2`, 4 through the bench script's own code)
def test_sweep_and_compare_reproduce_bench_compare_signsgd(tmp_path, monkeypatch):
    """bench/compare_signsgd.py's table (final and best test accuracy, uplink bytes) from one sweep and
    ``fedsim compare``, at reduced rounds, for two of its four variants: the same numbers, exactly."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import compare_signsgd as bench

    variants = [v for v in bench.VARIANTS if v[0] in ("signSGD (plain)", "noisy medianSGD")]
    seeds, extra = [0, 1], ["run.rounds=3", "run.eval_every=2"]
    grid = ",".join(f'{{name="{s}",b={b!r},delta={d!r}}}' for _, s, b, d in variants)
    out = tmp_path / "sweep"
    _fedsim("sweep", str(bench.SCENARIO), "--grid", f"strategy={grid}", "--seeds", "0,1", "--jobs", "2",
            "--out", str(out), *(a for e in extra for a in ("--set", e)), "--quiet")
    report = {}
    for at in ("last", "max"):
        data = json.loads(_fedsim("compare", str(out), "--metric", "test_accuracy", "--metric",
                                  "uplink-bytes-per-client", "--round", at, "--format", "json"))
        report[at] = {g["setting"]["strategy.name"]: g["metrics"] for g in data["groups"]}
    assert (out / "compare_test_accuracy__uplink-bytes-per-client.png").stat().st_size > 1000
    for _, strategy, b, delta in variants:
        runs = [bench.run_one(strategy, b, delta, seed, extra) for seed in seeds]
        for at, key in (("last", "final"), ("max", "best")):
            got = report[at][strategy]["test_accuracy"]
            assert got["values"] == [r[key] for r in runs], (strategy, at)
            assert got["mean"] == pytest.approx(np.mean([r[key] for r in runs]), abs=1e-15)
            assert got["std"] == pytest.approx(np.std([r[key] for r in runs], ddof=1), abs=1e-15)
            assert bench.fmt(got["values"]) == bench.fmt([r[key] for r in runs])
        assert report["last"][strategy]["uplink-bytes-per-client"]["values"] == [r["uplink"] for r in runs]
