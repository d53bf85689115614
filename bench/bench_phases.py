"""Where a whole ``fedsim run`` process spends its CPU time, by phase (issue 13, goal 2's profile).

Runs ``fedsim run`` in this process (the CLI's own ``main``) on a workload of ``bench_users.py`` and
prints the CPU seconds (``time.process_time``) of each phase:

* ``imports + scenario``  the CLI, then ``_load``: PyTorch, Flower, the registries, the scenario checked;
* ``federation + rounds`` the run up to its last round: data, model, round 0 evaluation, every round,
                          the run directory and the final checkpoint;
* ``plots``               ``fedsim.plots.plot_run``: importing Matplotlib and drawing the run's PNGs.

Beside it, a fresh ``python -c "import torch"`` and ``import torch, flwr`` for the floor the imports
cannot go below. Medians over ``--repeats`` fresh processes.

Usage:  python bench/bench_phases.py [many-small-mlp|few-cnn] [--vectorize auto|true|false] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, sys, time
marks = [("start", time.process_time())]
import fedsim.cli as cli
import fedsim.plots as plots
load, plot_run = cli._load, plots.plot_run
def timed_load(*a, **k):
    out = load(*a, **k); marks.append(("imports + scenario", time.process_time())); return out
def timed_plots(*a, **k):
    marks.append(("federation + rounds", time.process_time()))
    out = plot_run(*a, **k); marks.append(("plots", time.process_time())); return out
cli._load, plots.plot_run = timed_load, timed_plots
sys.argv = ["fedsim", "run", sys.argv[1], "--set", "run.vectorize=" + sys.argv[2], "--out", sys.argv[3]]
try:
    cli.main()
except SystemExit as e:
    if e.code:
        raise
marks.append(("summary", time.process_time()))
print("PHASES " + json.dumps(marks))
"""


def cpu_of(cmd: list[str]) -> float:
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    if status:
        raise SystemExit(f"{cmd} failed")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", nargs="?", default="many-small-mlp")
    ap.add_argument("--vectorize", default="true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import tomli_w
    from bench_users import ROUNDS, scenario

    phases: dict[str, list[float]] = {}
    floors: dict[str, list[float]] = {"python -c 'import torch'": [], "python -c 'import torch, flwr.serverapp'": []}
    with tempfile.TemporaryDirectory() as d:
        toml = Path(d) / "scenario.toml"
        toml.write_text(tomli_w.dumps(scenario(args.workload, ROUNDS[args.workload])))
        for r in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, str(toml), args.vectorize, str(Path(d) / f"run{r}")],
                                 capture_output=True, text=True, check=True).stdout
            marks = json.loads(next(line for line in out.splitlines() if line.startswith("PHASES "))[7:])
            for (_, t0), (name, t1) in zip(marks, marks[1:]):
                phases.setdefault(name, []).append(t1 - t0)
            phases.setdefault("whole process (in-process clock)", []).append(marks[-1][1])
            floors["python -c 'import torch'"].append(cpu_of([sys.executable, "-c", "import torch"]))
            floors["python -c 'import torch, flwr.serverapp'"].append(
                cpu_of([sys.executable, "-c", "import torch, flwr.serverapp"]))
    print(f"fedsim run, {args.workload}, {ROUNDS[args.workload]} rounds, run.vectorize = {args.vectorize}: "
          f"CPU s, median of {args.repeats} fresh processes")
    for name, ts in {**phases, **floors}.items():
        print(f"  {name:42s} {statistics.median(ts):6.3f}   [{', '.join(f'{t:.3f}' for t in ts)}]")


if __name__ == "__main__":
    main()
