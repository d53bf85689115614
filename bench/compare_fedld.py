"""FedLD (paper), FedLD with the alignment guard, and FedAvg under label skew; mean ± std of the
final test accuracy over seeds, with the regime FedLD reports (issue 12).

    python bench/compare_fedld.py                       # Dirichlet 0.1 / 0.5 / IID, seeds 0 1 2, 12 clients, 30 rounds
    python bench/compare_fedld.py --splits 0.1 --seeds 0 1 2 3 4 --rounds 60

Scenario ``scenarios/fedld_noniid.toml`` (digits, MLP, 2 local epochs, SGD lr 0.05 momentum 0.5
wd 5e-4, κ = 0.8, λ = 0.03) with ``data.num_clients`` and ``run.rounds`` set from the command line.
Regime columns (paper FedLD's runs, median over rounds 2..R, then mean over seeds):
``fedld-alignment`` (median pairwise cosine of the client updates), ``fedld-step-cosine`` and
``fedld-step-ratio`` (FedLD's step against the plain mean); for the guarded runs ``fedld-weight``
(the weight of FedLD's own aggregate, ``clip(alignment / min_alignment, 0, 1)``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

from _compare import fmt, load, table

from fedsim.config import scenario_from_dict
from fedsim.engines.local import run_local
from fedsim.results import read_jsonl


def run(raw: dict, seed: int) -> tuple[float, list[dict]]:
    """Final test accuracy and the metrics rows (round >= 1) of one run."""
    r = copy.deepcopy(raw)
    r.setdefault("run", {}).update({"seed": seed, "progress": False, "checkpoint_every": 0})
    with tempfile.TemporaryDirectory() as d:
        summary = run_local(scenario_from_dict(r), Path(d) / "run")
        rows = [x for x in read_jsonl(Path(d) / "run" / "metrics.jsonl") if x.get("round", 0) >= 1]
    if summary["status"] != "completed":
        raise SystemExit(f"seed {seed}: run {summary['status']}: {summary.get('error')}")
    return float(summary["final"]["test_accuracy"]), rows


def regime(runs: list[list[dict]], key: str) -> float:
    """Mean over seeds of the median over rounds 2..R of ``key``."""
    return statistics.mean(statistics.median(r[key] for r in rows[1:] if key in r) for rows in runs)


def variants(raw: dict, min_alignment: float) -> dict[str, dict]:
    guard = copy.deepcopy(raw)
    guard["strategy"].update({"guard": "alignment", "min_alignment": min_alignment})
    avg = copy.deepcopy(raw)
    avg["strategy"] = {"name": "fedavg"}
    return {"paper": raw, "guard": guard, "fedavg": avg}


def with_split(base: dict, split: str) -> dict:
    """``base`` on a Dirichlet(``split``) partition, or IID for ``split = "iid"``."""
    raw = copy.deepcopy(base)
    if split == "iid":
        raw["data"]["partitioner"] = "iid"
        raw["data"].pop("partition", None)
    else:
        raw["data"]["partition"]["alpha"] = float(split)
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--splits", nargs="+", default=["0.1", "0.5", "iid"], help="Dirichlet alphas or 'iid'")
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--min-alignment", type=float, default=0.5)
    args = ap.parse_args()
    base = load("fedld_noniid.toml")
    base["data"]["num_clients"] = args.clients
    base["run"]["rounds"] = args.rounds
    rows = []
    for split in args.splits:
        raw = with_split(base, split)
        acc, logs = {}, {}
        for name, scen in variants(raw, args.min_alignment).items():
            results = [run(scen, seed) for seed in args.seeds]
            acc[name], logs[name] = [a for a, _ in results], [rs for _, rs in results]
        label = "IID" if split == "iid" else f"Dirichlet {split}"
        rows.append((label, fmt(acc["paper"]), fmt(acc["guard"]), fmt(acc["fedavg"]),
                     f"{regime(logs['paper'], 'fedld-alignment'):.3f}",
                     f"{regime(logs['paper'], 'fedld-step-cosine'):.2f} / "
                     f"{regime(logs['paper'], 'fedld-step-ratio'):.2f}",
                     f"{regime(logs['guard'], 'fedld-weight'):.2f}"))
        print(rows[-1], flush=True)
    print(f"\n{args.clients} clients, {args.rounds} rounds, seeds {args.seeds}, min_alignment {args.min_alignment}.\n")
    print(table(rows, ("split", "FedLD (paper)", "FedLD (guard = alignment)", "FedAvg", "update alignment",
                       "paper step: cosine / norm vs mean", "guard weight")))


if __name__ == "__main__":
    main()
