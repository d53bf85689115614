"""Plain vs noisy signSGD (majority vote) and medianSGD on the label-skew scenario, over seeds.

    python bench/compare_signsgd.py                       # seeds 0 1 2, scenarios/signsgd_label_skew.toml
    python bench/compare_signsgd.py --seeds 0 1 2 3 4 --set data.partition.num_classes_per_partition=2

Every run goes through the local engine (the real ServerApp and ClientApp). Prints a markdown
table: final test accuracy (mean ± std over seeds), the best accuracy seen at the evaluation
rounds, and the uplink bytes per client and round. Step sizes: the vote has unit-size coordinates,
so signSGD steps delta = 0.01; the median has gradient-size coordinates, so medianSGD steps
delta = 0.1. Noise: b = 0.03 for the sign, b = 0.3 for the median (chosen on seed 0 from
b in {1e-3, 1e-2, 3e-2, 0.1, 0.3, 1}; spec section 3 notes that b trades bias for variance).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "signsgd_label_skew.toml"

#: (label, strategy, b, delta)
VARIANTS = [
    ("signSGD (plain)", "signsgd", 0.0, 0.01),
    ("noisy signSGD", "signsgd", 0.03, 0.01),
    ("medianSGD (plain)", "mediansgd", 0.0, 0.1),
    ("noisy medianSGD", "mediansgd", 0.3, 0.1),
]


def run_one(strategy: str, b: float, delta: float, seed: int, extra: list[str]) -> dict:
    from fedsim.config import load_scenario
    from fedsim.engines.local import run_local
    from fedsim.results import read_jsonl

    sets = [f'strategy.name="{strategy}"', f"strategy.b={b}", f"strategy.delta={delta}", f"run.seed={seed}",
            "run.progress=false", *extra]
    scen = load_scenario(SCENARIO, sets)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = run_local(scen, out)
        wall = time.perf_counter() - t0
        rows = read_jsonl(Path(out) / "metrics.jsonl")
    if summary["status"] != "completed":
        raise SystemExit(f"{strategy} b={b} seed={seed}: {summary['status']} {summary.get('error')}")
    accs = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
    trained = [r for r in rows if r["round"] > 0]
    return {"final": accs[-1], "best": max(accs), "uplink": trained[-1]["uplink-bytes-per-client"], "wall": wall}


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra scenario override")
    args = ap.parse_args(argv)
    results = []
    for label, strategy, b, delta in VARIANTS:
        runs = [run_one(strategy, b, delta, seed, args.sets) for seed in args.seeds]
        results.append((label, strategy, b, delta, runs))
        print(f"  {label}: {[round(r['final'], 3) for r in runs]} ({sum(r['wall'] for r in runs):.1f} s)",
              file=sys.stderr, flush=True)
    print(f"\nScenario `{SCENARIO.relative_to(ROOT)}` {' '.join(args.sets)}; seeds {args.seeds}; "
          "local engine.\n")
    print("| method | b | delta | final test accuracy | best test accuracy | uplink bytes / client / round |")
    print("|---|---|---|---|---|---|")
    for label, _, b, delta, runs in results:
        print(f"| {label} | {b:g} | {delta:g} | {fmt([r['final'] for r in runs])} | "
              f"{fmt([r['best'] for r in runs])} | {runs[0]['uplink']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
