"""Accuracy vs ε for the three private scenarios (DP-SGD, DP-FedAvg, DP-FTRL) over seeds and noise levels.

For each scenario and noise multiplier the script runs every seed, and reports the final test
accuracy (mean ± std) and the final total ε(δ) (mean; it depends on the seed only through
participation), then draws the privacy–utility plot across all runs.

Usage: python bench/compare_privacy.py [--seeds 0 1 2] [--out bench/privacy_utility.png]
"""

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

from _compare import fmt, load, table
from fedsim.config import scenario_from_dict
from fedsim.engines.local import run_local
from fedsim.plots import plot_privacy_utility
from fedsim.results import read_jsonl

GRID = {"dp_sgd_digits.toml": [0.0, 1.0, 2.0, 4.0], "dp_fedavg_digits.toml": [0.0, 0.8, 1.3, 2.5],
        "dp_ftrl_digits.toml": [0.0, 2.0, 3.0, 6.0]}  # z = 0: same clipping, no noise (ε = ∞), the utility ceiling


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("bench/privacy_utility.png"))
    args = ap.parse_args()
    rows, dirs = [], []
    tmp = Path(tempfile.mkdtemp(prefix="fedsim-privacy-"))
    for name, noises in GRID.items():
        for z in noises:
            accs, eps = [], []
            for seed in args.seeds:
                raw = copy.deepcopy(load(name))
                raw["run"].update({"seed": seed, "progress": False})
                raw["privacy"].update({"noise_multiplier": z, "max_epsilon": 0.0})
                d = tmp / f"{name[:-5]}-z{z}-s{seed}"
                summary = run_local(scenario_from_dict(raw), d)
                accs.append(summary["final"]["test_accuracy"])
                eps.append([p for p in read_jsonl(d / "privacy.jsonl") if p["mechanism"] == "total"][-1]["epsilon"])
                dirs.append(d)
            mean_eps = statistics.mean(eps)
            rows.append((name[:-5], f"{z:g}", f"{mean_eps:.2f}" if mean_eps < 1e100 else "∞", fmt(accs)))
            print(rows[-1], flush=True)
    print(table(rows, ("scenario", "noise z", "ε total (δ=1e-5)", "test accuracy")))
    plot_privacy_utility(dirs, args.out)  # z = 0 runs (ε = ∞) are drawn as each mechanism's ceiling line
    print(f"plot: {args.out}")
    (tmp / "rows.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
