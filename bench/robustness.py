"""Robustness report: every robust strategy (and FedAvg, undefended) × every Byzantine attack.

    python bench/robustness.py                      # the full grid: writes bench/robustness.{csv,md,png}
    python bench/robustness.py --jobs 2 --resume    # two processes; keep the rows already in the CSV
    python bench/robustness.py --seeds 0 --fractions 0.3 --strategies fedavg centered_clip --attacks alie

Setting: the default scenario (scikit-learn digits, 10 clients, Dirichlet(0.5) label skew, MLP 64,
2 local epochs of SGD lr 0.05 momentum 0.9), local engine, ``run.vectorize = true`` (honest plain
clients train together; Byzantine ones stay per client). Model strategies run ``--rounds`` rounds,
the one-gradient-per-round strategies (signsgd, mediansgd, with their noise b > 0) ``--gradient-rounds``.
The Byzantine clients of seed ``s`` are the first ``f`` of a seeded permutation of the clients, so
the f = 1 set is inside the f = 2 set; f/n ∈ {0.1, 0.2, 0.3} is f ∈ {1, 2, 3} of 10.

The defences are provisioned for the largest f (3 of 10) in every cell, clean runs included, as an
operator who knows an upper bound on f would: trimmed mean β = 0.3, Krum f = 3, Multi-Krum f = 3
keeping 7. A cell that ``fedsim.faults.check_attack`` refuses (omniscient attacks on 1-bit signSGD)
is written as ``refused`` with the reason, never run; a run that fails is written as ``failed``.

Outputs: ``robustness.csv`` (one row per run), ``robustness.md`` (worst-case accuracy per strategy,
per-attack tables, convergence of the clean runs), ``robustness.png`` (heatmaps per f/n),
``robustness.json`` (command, wall time, convergence: what ``--report-only`` needs to redraw).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
N = 10
F_MAX = 3
ATTACKS = ["sign_flip", "gaussian", "nan", "label_flip", "alie", "ipm", "min_max", "min_sum"]
#: label -> (strategy.name, options, gradient strategy?)
STRATEGIES = {
    "fedavg": ("fedavg", {}, False),
    "fedmedian": ("fedmedian", {}, False),
    "trimmed_mean": ("trimmed_mean", {"beta": F_MAX / N}, False),
    "krum": ("krum", {"num_malicious": F_MAX}, False),
    "multi_krum": ("krum", {"num_malicious": F_MAX, "num_selected": N - F_MAX}, False),
    "fedld": ("fedld", {}, False),
    "centered_clip": ("centered_clip", {}, False),
    "mediansgd": ("mediansgd", {"b": 0.3, "delta": 0.1}, True),
    "signsgd": ("signsgd", {"b": 0.03, "delta": 0.01}, True),
}
FIELDS = ["strategy", "attack", "fraction", "f", "seed", "byzantine", "status", "test_accuracy", "rounds",
          "wall_s", "cpu_s", "note"]


def scenario_dict(label: str, attack: str, f: int, seed: int, rounds: int, grad_rounds: int,
                  eval_every: int | None = None) -> dict:
    from fedsim.rng import numpy_rng

    name, options, gradient = STRATEGIES[label]
    r = grad_rounds if gradient else rounds
    byz = sorted(int(i) for i in numpy_rng(seed, "robustness-byzantine").permutation(N)[:f])
    raw = {
        "run": {"name": f"rob-{label}", "seed": seed, "rounds": r, "progress": False, "checkpoint_every": 0,
                "eval_every": eval_every or r, "vectorize": True},
        "data": {"dataset": "digits", "num_clients": N, "partitioner": "dirichlet", "test_fraction": 0.2,
                 "partition": {"alpha": 0.5, "min_partition_size": 10}},
        "model": {"name": "mlp", "hidden": [64]},
        "client": {"epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "strategy": {"name": name, "min_train_clients": 2, **options},
    }
    if attack != "none":
        raw["faults"] = {"attack": attack, "byzantine_clients": byz}
    return raw


def run_cell(job: tuple) -> dict:
    """One run (or a refusal) of the grid; returns its CSV row."""
    label, attack, frac, seed, rounds, grad_rounds = job
    from fedsim.catalog import registries, resolve
    from fedsim.config import scenario_from_dict
    from fedsim.engines.local import run_local
    from fedsim.errors import ConfigError, FedSimError
    from fedsim.faults import check_attack

    f = round(frac * N)
    raw = scenario_dict(label, attack, f, seed, rounds, grad_rounds)
    row = {"strategy": label, "attack": attack, "fraction": frac, "f": f, "seed": seed,
           "byzantine": " ".join(map(str, raw.get("faults", {}).get("byzantine_clients", []))),
           "rounds": raw["run"]["rounds"], "test_accuracy": "", "wall_s": "", "cpu_s": "", "note": ""}
    try:
        scen = resolve(scenario_from_dict(raw))
        check_attack(scen, registries()["strategies"].get(scen.strategy.name))
    except ConfigError as err:
        return {**row, "status": "refused", "note": str(err)}
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as out:
        try:
            summary = run_local(scen, Path(out) / "run")
        except FedSimError as err:  # a typed stop (e.g. a round the aggregator refused): summary.json says so
            summary = {"status": f"stopped: {type(err).__name__}", "error": str(err)}
    row.update(wall_s=f"{time.perf_counter() - t0:.2f}", cpu_s=f"{time.process_time() - c0:.2f}")
    if summary.get("status") != "completed":
        return {**row, "status": "failed", "note": str(summary.get("error", summary.get("status")))[:300]}
    acc = float(summary["final"]["test_accuracy"])
    return {**row, "status": "completed", "test_accuracy": f"{acc:.4f}"}


def convergence(label: str, rounds: int, grad_rounds: int) -> list[tuple[int, float]]:
    """Test accuracy of the clean seed-0 run at four evaluation points."""
    from fedsim.config import scenario_from_dict
    from fedsim.engines.local import run_local
    from fedsim.results import read_jsonl

    r = grad_rounds if STRATEGIES[label][2] else rounds
    raw = scenario_dict(label, "none", 0, 0, rounds, grad_rounds, eval_every=max(r // 4, 1))
    with tempfile.TemporaryDirectory() as out:
        run_local(scenario_from_dict(raw), Path(out) / "run")
        rows = read_jsonl(Path(out) / "run" / "metrics.jsonl")
    return [(int(x["round"]), float(x["test_accuracy"])) for x in rows if x["round"] > 0 and "test_accuracy" in x]


# ------------------------------------------------------------------------------ report
def _cells(rows: list[dict]) -> dict[tuple[str, str, float], list[dict]]:
    out: dict[tuple[str, str, float], list[dict]] = {}
    for r in rows:
        out.setdefault((r["strategy"], r["attack"], float(r["fraction"])), []).append(r)
    return out


def _mean(rs: list[dict]) -> tuple[float, float] | None:
    """Mean and std (ddof 1) of the cell's test accuracy over seeds; ``None`` when any run of the cell
    did not complete (reported as such, never averaged away)."""
    import statistics

    if not rs or any(r["status"] != "completed" for r in rs):
        return None
    accs = [float(r["test_accuracy"]) for r in rs]
    return statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def _cell_text(rs: list[dict]) -> str:
    m = _mean(rs)
    if m is not None:
        return f"{m[0]:.3f} ± {m[1]:.3f}"
    states = sorted({r["status"] for r in rs})
    return "refused" if states == ["refused"] else "/".join(states)


def write_report(path: Path, rows: list[dict], conv: dict, cmd: str, wall: float, args) -> None:
    cells = _cells(rows)
    labels = [s for s in STRATEGIES if any(k[0] == s for k in cells)]
    attacks = [a for a in ATTACKS if any(k[1] == a for k in cells)]
    fracs = sorted({k[2] for k in cells if k[1] != "none"})
    cpu = sum(float(r["cpu_s"] or 0) for r in rows)
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = [f"Command: `{cmd}`; seeds {seeds}; {len(rows)} cells; this invocation {wall / 60:.1f} min wall, "
             f"CPU time of all runs in the CSV {cpu / 60:.1f} min.", "",
             "Worst case = the lowest seed-mean test accuracy over every attack and f/n; `refused` cells are not "
             "runs (the strategy cannot express the attack) and are left out of the worst case; a cell with a "
             "failed run is reported as failed.", "",
             "| strategy | clean | worst case | worst cell | refused cells |", "|---|---|---|---|---|"]
    for s in labels:
        clean = _cell_text(cells.get((s, "none", 0.0), []))
        worst, where, refused = None, "", 0
        for a in attacks:
            for fr in fracs:
                rs = cells.get((s, a, fr), [])
                if rs and all(r["status"] == "refused" for r in rs):
                    refused += 1
                    continue
                m = _mean(rs)
                val = m[0] if m is not None else -1.0  # a failed run is the worst outcome
                if rs and (worst is None or val < worst):
                    worst, where = val, f"{a} @ {fr:g}"
        shown = "–" if worst is None else ("failed" if worst < 0 else f"{worst:.3f}")
        lines.append(f"| {s} | {clean} | {shown} | {where or '–'} | {refused} |")
    for fr in fracs:
        lines += ["", f"Test accuracy at f/n = {fr:g} (mean ± std over seeds):", "",
                  "| strategy | clean | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 2) + "|"]
        for s in labels:
            lines.append(f"| {s} | {_cell_text(cells.get((s, 'none', 0.0), []))} | "
                         + " | ".join(_cell_text(cells.get((s, a, fr), [])) for a in attacks) + " |")
    lines += ["", "Convergence of the clean runs (seed 0, test accuracy at the evaluation rounds):", ""]
    lines += [f"* {s}: " + ", ".join(f"round {r}: {a:.3f}" for r, a in conv.get(s, [])) for s in labels]
    notes = sorted({(r["strategy"], r["attack"], r["note"]) for r in rows if r["status"] != "completed"})
    if notes:
        lines += ["", "Cells not completed:", ""] + [f"* {s} × {a}: {n}" for s, a, n in notes]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = _cells(rows)
    labels = [s for s in STRATEGIES if any(k[0] == s for k in cells)]
    attacks = [a for a in ATTACKS if any(k[1] == a for k in cells)]
    fracs = sorted({k[2] for k in cells if k[1] != "none"})
    cols = ["clean", *attacks]
    fig, axes = plt.subplots(1, len(fracs), figsize=(4.6 * len(fracs) + 1.2, 0.45 * len(labels) + 2.2),
                             squeeze=False, sharey=True)
    for k, (ax, fr) in enumerate(zip(axes[0], fracs)):
        grid = np.full((len(labels), len(cols)), np.nan)
        text = [["" for _ in cols] for _ in labels]
        for i, s in enumerate(labels):
            for j, a in enumerate(cols):
                rs = cells.get((s, "none", 0.0) if a == "clean" else (s, a, fr), [])
                m = _mean(rs)
                if m is not None:
                    grid[i, j] = m[0]
                    text[i][j] = f"{m[0]:.2f}"
                elif rs:
                    text[i][j] = "ref." if all(r["status"] == "refused" for r in rs) else "fail"
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i in range(len(labels)):
            for j in range(len(cols)):
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7,
                        color="black" if not np.isnan(grid[i, j]) and grid[i, j] > 0.6 else "white")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.tick_params(labelleft=k == 0)
        ax.set_facecolor("0.6")
        ax.set_title(f"f/n = {fr:g}: test accuracy (mean over seeds)", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ATTACKS)
    ap.add_argument("--rounds", type=int, default=20, help="rounds of the model strategies")
    ap.add_argument("--gradient-rounds", type=int, default=200, help="rounds of signsgd / mediansgd")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="keep rows already in the CSV, run the rest")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for robustness.{csv,json,md,png}")
    ap.add_argument("--report-only", action="store_true", help="redraw the table and plot from the CSV and JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        with (args.out / "robustness.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        meta = json.loads((args.out / "robustness.json").read_text())
        write_report(args.out / "robustness.md", rows, meta["convergence"], meta["command"], meta["wall_s"], args)
        write_plot(args.out / "robustness.png", rows)
        return 0
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "robustness.csv"
    done: list[dict] = []
    if args.resume and csv_path.exists():
        with csv_path.open() as fh:
            done = list(csv.DictReader(fh))
    key = lambda r: (r["strategy"], r["attack"], float(r["fraction"]), int(r["seed"]))  # noqa: E731
    have = {key(r) for r in done}
    jobs = []
    for label in args.strategies:
        for seed in args.seeds:
            cells = [("none", 0.0)] + [(a, fr) for a in args.attacks for fr in args.fractions]
            for attack, frac in cells:
                if (label, attack, frac, seed) not in have:
                    jobs.append((label, attack, frac, seed, args.rounds, args.gradient_rounds))
    print(f"{len(jobs)} cells to run ({len(done)} kept)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rows = list(done)
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(done)
        fh.flush()
        with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker) as pool:
            for i, row in enumerate(pool.map(run_cell, jobs), 1):
                rows.append(row)
                writer.writerow(row)
                fh.flush()
                print(f"[{i}/{len(jobs)}] {row['strategy']} {row['attack']} f={row['f']} s={row['seed']}: "
                      f"{row['status']} {row['test_accuracy']}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    conv = {}
    if args.resume and (args.out / "robustness.json").exists():  # keep the strategies not run again
        conv = json.loads((args.out / "robustness.json").read_text()).get("convergence", {})
    conv.update({label: convergence(label, args.rounds, args.gradient_rounds) for label in args.strategies})
    cmd = ("python bench/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    meta = {"command": cmd, "wall_s": wall, "convergence": conv}
    (args.out / "robustness.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_report(args.out / "robustness.md", rows, conv, cmd, wall, args)
    write_plot(args.out / "robustness.png", rows)
    print((args.out / "robustness.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
