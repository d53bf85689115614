"""Shared helpers of the comparison scripts: run a scenario dict over seeds, print mean ± std."""

from __future__ import annotations

import copy
import statistics
import tempfile
import tomllib
from pathlib import Path

from fedsim.config import scenario_from_dict
from fedsim.engines.local import run_local

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> dict:
    return tomllib.loads((ROOT / "scenarios" / name).read_text())


def run_seeds(raw: dict, seeds: list[int], key: str = "test_accuracy") -> list[float]:
    out = []
    for seed in seeds:
        r = copy.deepcopy(raw)
        r.setdefault("run", {}).update({"seed": seed, "progress": False, "checkpoint_every": 0})
        with tempfile.TemporaryDirectory() as d:
            summary = run_local(scenario_from_dict(r), Path(d) / "run")
        out.append(float(summary["final"][key]))
    return out


def fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
