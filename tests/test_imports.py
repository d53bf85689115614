"""Start-up: no built-in command imports Ray, Opacus, dp-accounting, matplotlib, pandas or Flower's
simulation package unless it uses them.

Each of these costs about a second or more to import (issue 13, goal 4: ``fedsim --help``, ``fedsim
list`` and ``fedsim privacy epsilon`` within 1.5 s of a bare ``import torch``). The commands run as a
user runs them, through ``fedsim.cli.main``, in a fresh interpreter; an import hook records which
fedsim module first imported each heavy package, so a failure names the line to fix (move the import
into the function that uses it). Wall-clock time is never asserted here: it depends on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("ray", "opacus", "dp_accounting", "matplotlib", "pandas", "flwr.simulation")

#: runs the commands given as JSON in argv[1] one after another in this process and writes to argv[2],
#: after each one, its exit code, the heavy packages loaded so far and who imported each first
PROBE = r"""
import gc, json, sys, traceback
HEAVY = %(heavy)r
first = {}

class Spy:
    def find_spec(self, name, path=None, target=None):
        top = next((m for m in HEAVY if name == m or name.startswith(m + ".")), None)
        if top is not None and top not in first:
            frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            mine = [f for f in frames if "site-packages" not in f.filename and "<" not in f.filename]
            where = (mine or frames)[-1]
            first[top] = f"{where.filename}:{where.lineno} ({where.line})"
        return None

sys.meta_path.insert(0, Spy())
from fedsim.cli import main

commands, out = json.loads(sys.argv[1]), sys.argv[2]
report = []
for args in commands:
    sys.argv = ["fedsim", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    loaded = sorted(m for m in HEAVY if m in sys.modules)
    report.append({"args": args, "code": code, "loaded": loaded, "by": {m: first.get(m) for m in loaded},
                   "gc": {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}})
with open(out, "w") as fh:
    json.dump(report, fh)
"""


def probe(commands: list[list[str]], tmp_path: Path, heavy: tuple[str, ...] = HEAVY) -> tuple[list[dict], str]:
    """Run ``commands`` in order in one fresh interpreter: one report per command (cumulative imports of
    the ``heavy`` packages), and what they printed on stderr."""
    out = tmp_path / "imports.json"
    script = PROBE % {"heavy": heavy}
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(commands), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stderr


def assert_not_imported(report: dict, forbidden: tuple[str, ...]) -> None:
    bad = [m for m in forbidden if m in report["loaded"]]
    assert report["code"] == 0, report
    assert not bad, (f"`fedsim {' '.join(report['args'])}` imported {bad}, which it does not use; first "
                     f"imported at: {json.dumps({m: report['by'][m] for m in bad}, indent=1)} — import them "
                     "inside the functions that use them")


def test_commands_that_need_no_heavy_module_import_none(tmp_path):
    """In one interpreter, lightest first, so each report shows what that command added."""
    commands = [["--help"], ["--version"], ["list"], ["list", "--format", "json"],
                ["partition", "scenarios/default.toml", "--format", "json"],
                ["privacy", "epsilon", "--noise", "1.0", "--sample-rate", "0.01", "--steps", "100"]]
    reports, _ = probe(commands, tmp_path)
    for report in reports[:-1]:
        assert_not_imported(report, HEAVY)
    # privacy epsilon uses dp-accounting (its RDP/PLD accountants), and nothing else heavy
    assert_not_imported(reports[-1], tuple(m for m in HEAVY if m != "dp_accounting"))
    assert reports[-1]["loaded"] == ["dp_accounting"], "the probe must see a module a command does import"
    assert "privacy" in reports[-1]["by"]["dp_accounting"], reports[-1]


@pytest.mark.slow
def test_a_non_private_run_imports_no_privacy_library_and_no_ray_and_quiet_prints_no_progress(tmp_path):
    run = ["run", "scenarios/default.toml", "--set", "run.rounds=2", "--set", "data.num_clients=4",
           "--set", "client.max_steps=2", "--set", "strategy.min_train_clients=2", "--out", str(tmp_path / "run"),
           "--quiet"]
    (report,), stderr = probe([run], tmp_path)
    assert_not_imported(report, tuple(m for m in HEAVY if m != "matplotlib"))
    assert report["loaded"] == ["matplotlib"], report  # the run's plots: the probe sees what a run does import
    assert (tmp_path / "run" / "summary.json").is_file()
    assert not [x for x in stderr.splitlines() if x.startswith(("round ", "fedsim: "))], stderr  # --quiet


#: what round 1 of a default run once imported (issue 13): torch.func's first call imports torch._dynamo
#: (≈800 modules with sympy and mpmath, seconds), the digits loader imported scikit-learn and SciPy
ROUND_ONE = ("torch._dynamo", "torch._inductor", "sympy", "sklearn", "scipy")


@pytest.mark.slow
def test_a_default_run_imports_no_dynamo_sympy_or_scikit_learn(tmp_path):
    """The default scenario's batched MLP clients train on the stacked path (clients/batched_stacked.py,
    no torch.func) and the digits come from scikit-learn's bundled file, not from importing it."""
    run = ["run", "scenarios/default.toml", "--set", "run.rounds=2", "--out", str(tmp_path / "run"), "--quiet"]
    (report,), _ = probe([run], tmp_path, heavy=ROUND_ONE)
    assert_not_imported(report, ROUND_ONE)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["vectorized"]["used"] and summary["vectorized"]["clients_batched"] == 20  # 2 rounds × 10
    # fedsim.cli._start_up: no collection during the start-up imports, then they are frozen; collection is on again
    assert report["gc"]["enabled"] and report["gc"]["frozen"] > 10_000, report["gc"]
