"""Rounds-only CPU seconds of the local engine against the plain loop, in one process (issue 13, goals 1-2).

CPU time (``time.process_time``) rather than wall time, so that the ratios hold on a shared, loaded
machine: for each setting of ``run.vectorize`` the CPU spent between the end of round 0 (initial
evaluation, run directory) and the end of the last round (``run_local``'s ``on_round`` callback),
against :func:`bench_engine.plain_time`'s loop doing the same sample-steps. The rows "wire meter
stubbed" replace ``fedsim.strategies.wire_bytes.message_bytes`` (the byte count of every message as
Flower serialises it, content hashes included) by 0, to show what that metering costs.

Usage:  python bench/bench_rounds_cpu.py many-small-mlp|few-cnn [repeats=3]
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import WORKLOADS, plain_time  # noqa: E402

import fedsim.strategies.wire_bytes as wire  # noqa: E402
from fedsim.config import scenario_from_dict  # noqa: E402
from fedsim.engines.local import run_local  # noqa: E402

REAL_METER = wire.message_bytes


def fedsim_cpu(raw: dict, setting: bool | str, meter: bool = True) -> float:
    raw = copy.deepcopy(raw)
    raw["run"]["vectorize"] = setting
    marks: dict[int, float] = {}
    wire.message_bytes = REAL_METER if meter else (lambda msg, cache=None: 0)
    try:
        with tempfile.TemporaryDirectory() as d:
            run_local(scenario_from_dict(raw), Path(d) / "run",
                      on_round=lambda rnd, row: marks.__setitem__(rnd, time.process_time()))
    finally:
        wire.message_bytes = REAL_METER
    return marks[max(marks)] - marks[0]


def plain_cpu(raw: dict) -> float:
    t0 = time.process_time()
    plain_time(raw)
    return time.process_time() - t0


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "many-small-mlp"
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    raw = WORKLOADS[name]
    rows = {"plain loop": lambda: plain_cpu(raw),
            "per client (vectorize = false)": lambda: fedsim_cpu(raw, False),
            "default (vectorize = auto)": lambda: fedsim_cpu(raw, "auto"),
            "vectorize = true": lambda: fedsim_cpu(raw, True),
            "default, wire meter stubbed": lambda: fedsim_cpu(raw, "auto", meter=False),
            "per client, wire meter stubbed": lambda: fedsim_cpu(raw, False, meter=False)}
    plain_cpu(raw), fedsim_cpu(raw, "auto")  # warm-up: dataset cache, kernels
    got: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(repeats):  # interleaved: every row sees the same load
        for k, run in rows.items():
            got[k].append(run())
    base = statistics.median(got["plain loop"])
    for k, v in got.items():
        m = statistics.median(v)
        print(f"{name:15s} {k:32s} CPU {m:6.3f} s  ratio {m / base:5.2f}x  {[round(x, 3) for x in v]}")


if __name__ == "__main__":
    main()
