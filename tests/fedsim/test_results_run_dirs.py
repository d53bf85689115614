"""Run directories under concurrency (issue 14, item 3): runs started at the same moment — threads,
processes, two ``fedsim run`` commands — each get their own directory, created exclusively; an
``out-dir`` given to the Flower app is refused when it already holds files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedsim.errors import RunDirectoryError
from fedsim.results import create_run_dir, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
STAMP = "20260101-000000"  # one fixed second for every caller: only exclusive creation can tell them apart


def test_threads_creating_the_same_run_directory_at_once_get_one_each(tmp_path):
    n = 16
    barrier = threading.Barrier(n)
    got: list[Path] = []
    lock = threading.Lock()

    def make() -> None:
        barrier.wait()
        path = create_run_dir(tmp_path, "same", 0, stamp=STAMP)
        with lock:
            got.append(path)

    threads = [threading.Thread(target=make) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == n and all(p.is_dir() for p in got)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"same-{STAMP}-s0"] + [f"same-{STAMP}-s0-{i}" for i in range(2, n + 1)])


def test_processes_creating_the_same_run_directory_at_once_get_one_each(tmp_path):
    go = tmp_path / "go"
    code = ("import os, sys, time\n"
            "from fedsim.results import create_run_dir\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
            f"print(create_run_dir(sys.argv[1], 'same', 0, stamp='{STAMP}'))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "runs"), str(go)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    go.write_text("")                                       # all four are waiting: release them together
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 4 and all(Path(o).is_dir() for o in outs)


@pytest.mark.slow
def test_two_fedsim_runs_started_at_once_write_two_directories(tmp_path):
    args = [sys.executable, "-m", "fedsim.cli", "run", "scenarios/default.toml", "--format", "json",
            "--set", "data.num_clients=4", "--set", "client.max_steps=2", "--set", "run.rounds=2",
            "--set", f'run.output="{tmp_path}"']
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    dirs = {Path(json.loads(o[0])["run_dir"]) for o in outs}
    assert len(dirs) == 2 and {d.parent for d in dirs} == {tmp_path}
    for d in dirs:                                          # each holds exactly one run, not a mix of two
        assert [r["round"] for r in read_jsonl(d / "metrics.jsonl")] == [0, 1, 2]
        assert json.loads((d / "summary.json").read_text())["run_dir"] == str(d)


def test_the_flower_app_refuses_an_out_dir_that_holds_files(tmp_path):
    from flwr.app import Context, RecordDict

    from fedsim.engines.local import LocalGrid
    from fedsim.flower_app import client_app, server_app

    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = {"scenario": "default", "overrides": "data.num_clients=2", "out-dir": str(out)}
    with pytest.raises(RunDirectoryError, match="run-config out-dir .* is not empty"):
        server_app(LocalGrid(client_app, 2, run_config=rc),
                   Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
