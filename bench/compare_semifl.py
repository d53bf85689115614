"""SemiFL vs the server-only baseline vs FedAvg trained on the labelled set alone (digits).

The labelled set is the server's ``data.server_labelled`` samples; "FedAvg on the labelled set"
spreads exactly those samples over the same number of clients (as labelled client data) and runs
FedAvg on them with the same test split. Mean ± std of final test accuracy over seeds.

Usage: python bench/compare_semifl.py [--seeds 0 1 2]
"""

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np

from _compare import fmt, load, run_seeds, table
from fedsim.config import scenario_from_dict
from fedsim.data.federation import federation_of


def labelled_only(raw: dict, seed: int, tmp: Path) -> dict:
    d = raw["data"]
    seeded = copy.deepcopy(raw)
    seeded.setdefault("run", {})["seed"] = seed
    fed = federation_of(scenario_from_dict(seeded))  # the federation the SemiFL run of this seed sees
    x, y = fed.server_data()
    path = tmp / f"labelled-{seed}.npz"
    np.savez(path, x_train=x, y_train=y, x_test=fed.x_test, y_test=fed.y_test)
    r = copy.deepcopy(raw)
    r["data"] = {"dataset": "npz", "options": {"path": str(path)}, "num_clients": d["num_clients"],
                 "partitioner": "iid"}
    r["strategy"] = {"name": "fedavg"}
    r["client"] = {"epochs": 5, "batch_size": 10, "lr": 0.03, "momentum": 0.9}
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    base = load("semifl_digits.toml")
    rows = []
    for split, part in (("IID", {"partitioner": "iid", "partition": {}}),
                        ("Dirichlet 0.3", {"partitioner": "dirichlet", "partition": {"alpha": 0.3, "min_partition_size": 5}})):
        raw = copy.deepcopy(base)
        raw["data"].update(part)
        semi = run_seeds(raw, args.seeds)
        so = copy.deepcopy(raw)
        so["strategy"]["server_only"] = True
        server_only = run_seeds(so, args.seeds)
        with tempfile.TemporaryDirectory() as d:
            fedavg = [run_seeds(labelled_only(raw, s, Path(d)), [s])[0] for s in args.seeds]
        rows.append((split, fmt(semi), fmt(server_only), fmt(fedavg)))
        print(rows[-1], flush=True)
    print(table(rows, ("clients' split", "SemiFL", "server only", "FedAvg on the labelled set")))


if __name__ == "__main__":
    main()
