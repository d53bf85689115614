"""FedLD vs FedAvg on non-IID digits, mean ± std of final test accuracy over seeds.

Usage: python bench/compare_fedld.py [--seeds 0 1 2] [--alphas 0.1 0.5]
"""

import argparse
import copy

from _compare import fmt, load, run_seeds, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    args = ap.parse_args()
    base = load("fedld_noniid.toml")
    rows = []
    for alpha in args.alphas:
        raw = copy.deepcopy(base)
        raw["data"]["partition"]["alpha"] = alpha
        ld = run_seeds(raw, args.seeds)
        avg_raw = copy.deepcopy(raw)
        avg_raw["strategy"] = {"name": "fedavg"}
        avg = run_seeds(avg_raw, args.seeds)
        rows.append((f"Dirichlet {alpha}", fmt(ld), fmt(avg)))
        print(rows[-1], flush=True)
    print(table(rows, ("split", "FedLD", "FedAvg")))


if __name__ == "__main__":
    main()
