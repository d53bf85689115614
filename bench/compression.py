"""Update compression: ScaleCom and dct_lowrank against FedAvg, bytes on the wire and accuracy, over seeds.

    python bench/compression.py                                  # seeds 0 1 2, scenarios/default.toml
    python bench/compression.py --rounds 10 --out bench/compression.md

Every run goes through the local engine (the real ServerApp and ClientApp). Bytes are the run's own
``uplink_bytes`` / ``downlink_bytes`` (serialised messages, ``fedsim.strategies.wire_bytes``) summed
over the run; the compression ratio is FedAvg's uplink over the method's. ScaleCom's downlink also
carries the leader's indices, and its uplink the leader's index message. Accuracy: final central
test accuracy, mean ± std over seeds; the accuracy cost is the method's minus FedAvg's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "default.toml"

#: (label, --set items)
VARIANTS = [
    ("FedAvg", ['strategy.name="fedavg"']),
    ("scalecom density 0.1, β 0.1", ['strategy.name="scalecom"', "strategy.density=0.1", "strategy.beta=0.1"]),
    ("scalecom density 0.1, β 1 (plain EF)", ['strategy.name="scalecom"', "strategy.density=0.1",
                                              "strategy.beta=1.0"]),
    ("dct_lowrank density 0.25", ['strategy.name="dct_lowrank"', "strategy.density=0.25"]),
]


def run_one(sets: list[str], seed: int, rounds: int, extra: list[str]) -> dict[str, float]:
    from fedsim.config import load_scenario
    from fedsim.engines.local import run_local
    from fedsim.results import read_jsonl

    scen = load_scenario(SCENARIO, [*sets, f"run.seed={seed}", f"run.rounds={rounds}", "run.progress=false", *extra])
    with tempfile.TemporaryDirectory() as out:
        summary = run_local(scen, out)
        rows = read_jsonl(Path(out) / "metrics.jsonl")[1:]
    if summary["status"] != "completed":
        raise SystemExit(f"{sets} seed={seed}: {summary['status']} {summary.get('error')}")
    return {"acc": float(rows[-1]["test_accuracy"]), "up": float(sum(r["uplink_bytes"] for r in rows)),
            "down": float(sum(r["downlink_bytes"] for r in rows))}


def table(results: dict[str, list[dict[str, float]]], seeds: list[int], rounds: int) -> str:
    base = results[VARIANTS[0][0]]
    base_up = np.mean([r["up"] for r in base])
    base_acc = np.array([r["acc"] for r in base])
    lines = [f"Scenario `scenarios/default.toml` (digits MLP, 10 clients, Dirichlet 0.5), {rounds} rounds, "
             f"seeds {' '.join(map(str, seeds))}; bytes summed over the run (all clients).", "",
             "| method | final accuracy | accuracy cost vs FedAvg | uplink MB | downlink MB | uplink compression |",
             "|---|---|---|---|---|---|"]
    for label, _ in VARIANTS:
        rs = results[label]
        acc = np.array([r["acc"] for r in rs])
        up, down = np.mean([r["up"] for r in rs]), np.mean([r["down"] for r in rs])
        cost = acc - base_acc  # paired by seed
        lines.append(f"| {label} | {acc.mean():.4f} ± {acc.std(ddof=1):.4f} | {cost.mean():+.4f} ± "
                     f"{cost.std(ddof=1):.4f} | {up / 1e6:.3f} | {down / 1e6:.3f} | {base_up / up:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra --set items for every run")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if len(args.seeds) < 2:
        ap.error("give at least 2 seeds (the table reports a standard deviation)")
    results = {label: [run_one(sets, s, args.rounds, args.extra) for s in args.seeds] for label, sets in VARIANTS}
    md = table(results, args.seeds, args.rounds)
    print(md)
    if args.out:
        args.out.write_text(md)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
