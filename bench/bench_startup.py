"""Start-up as a user feels it (issue 13, goal 4): light commands against a bare ``import torch``, and
round 1 of a run against its later rounds.

Each command is a fresh process, timed from outside (wall, and CPU of the process and its reaped
children via ``os.wait4``); commands are interleaved over the repeats so that they share the machine's
load; medians are printed. The goal: ``fedsim --help``, ``fedsim list`` and ``fedsim privacy epsilon``
within 1.5 s of ``python -c "import torch"``; round 1 costing no more than a later round plus the
model's first forward (rounds' ``wall_s`` from ``metrics.jsonl`` of ``fedsim run scenarios/default.toml``).

Usage:  python bench/bench_startup.py [--repeats 5] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
START, END = "<!-- bench_startup:start -->", "<!-- bench_startup:end -->"


def commands() -> dict[str, list[str]]:
    py = sys.executable
    fedsim = str(Path(py).with_name("fedsim"))
    return {
        'python -c "import torch"': [py, "-c", "import torch"],
        "fedsim --help": [fedsim, "--help"],
        "fedsim list": [fedsim, "list"],
        "fedsim privacy epsilon --noise 1.1 --sample-rate 0.01 --steps 1000": [
            fedsim, "privacy", "epsilon", "--noise", "1.1", "--sample-rate", "0.01", "--steps", "1000"],
    }


def timed(cmd: list[str]) -> dict:
    from bench_users import timed as timed_in

    return timed_in(cmd, ROOT)


def round_walls(tmp: Path, rep: int) -> list[float]:
    """``wall_s`` of rounds 1, 2, … of a default run (round 0 is the initial evaluation)."""
    fedsim = str(Path(sys.executable).with_name("fedsim"))
    out = tmp / f"run-{rep}"
    timed([fedsim, "run", str(ROOT / "scenarios" / "default.toml"), "--out", str(out), "--quiet"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["wall_s"]) for r in sorted(rows, key=lambda r: r["round"]) if r["round"] >= 1 and "wall_s" in r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="write the table to bench/RESULTS.md")
    args = ap.parse_args()
    cmds = commands()
    got: dict[str, list[dict]] = {k: [] for k in cmds}
    rounds: list[list[float]] = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, cmd in cmds.items():
                got[name].append(timed(cmd))
            rounds.append(round_walls(Path(tmp), rep))
    base = statistics.median(f["wall_s"] for f in got['python -c "import torch"'])
    base_cpu = statistics.median(f["cpu_s"] for f in got['python -c "import torch"'])
    lines = [f"| command | wall s (median of {args.repeats}) | over `import torch` | CPU s | CPU over `import torch` |",
             "|---|---|---|---|---|"]
    for name, figs in got.items():
        w = statistics.median(f["wall_s"] for f in figs)
        c = statistics.median(f["cpu_s"] for f in figs)
        lines.append(f"| `{name}` | {w:.2f} | {w - base:+.2f} s | {c:.2f} | {c - base_cpu:+.2f} s |")
    r1 = statistics.median(r[0] for r in rounds)
    later = statistics.median(statistics.median(r[1:]) for r in rounds)
    lines.append("")
    lines.append(f"`fedsim run scenarios/default.toml` (20 rounds, medians over {args.repeats} runs): round 1 "
                 f"{r1 * 1000:.0f} ms, a later round {later * 1000:.0f} ms (round 1 − later = "
                 f"{(r1 - later) * 1000:+.0f} ms). Load average {load0:.1f} at the start, "
                 f"{os.getloadavg()[0]:.1f} at the end; {os.cpu_count()} CPUs.")
    text = "\n".join(lines)
    print(text)
    if args.write:
        res = HERE / "RESULTS.md"
        doc = res.read_text()
        section = (f"{START}\n## Start-up (`python bench/bench_startup.py --write`)\n\n"
                   f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Issue 13, goal 4: each command a fresh "
                   f"process, interleaved.\n\n{text}\n{END}")
        if START in doc:
            doc = doc[:doc.index(START)] + section + doc[doc.index(END) + len(END):]
        else:
            anchor = "<!-- bench_users:end -->"
            doc = doc.replace(anchor, anchor + "\n\n" + section, 1)
        res.write_text(doc)


if __name__ == "__main__":
    main()
