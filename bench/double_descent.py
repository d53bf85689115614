"""Model-wise double descent in a federation: final test error against MLP width, with and without label noise.

Nakkiran, Kaplun, Bansal, Yang, Barak, Sutskever, "Deep Double Descent: Where Bigger Models and More Data
Hurt", ICLR 2020; Belkin, Hsu, Ma, Mandal, "Reconciling modern machine-learning practice and the classical
bias-variance trade-off", PNAS 2019. With label noise, test error is expected to rise as the model becomes
just able to fit the (noisy) training labels, and to fall again beyond that interpolation threshold.

The sweep runs ``scenarios/double_descent.toml`` (digits, IID clients, FedAvg, a one-hidden-layer MLP)
for every width in ``--widths`` and label-noise fraction in ``--noise`` (``model.hidden=[w]``,
``data.label_noise=q``), over ``--seeds``, on the local engine, and writes into ``--out``:

* ``double_descent.csv``: one row per run (width, parameters, noise, seed, final test error, the training
  error on the noisy labels over the last round's batches);
* ``double_descent.md``: the table of mean test error per width and noise;
* ``double_descent.png``: test error (solid) and training error (dashed) against width, log scale.

    python bench/double_descent.py                                     # the default sweep
    python bench/double_descent.py --widths 4 16 64 256 --noise 0 0.2 --rounds 30 --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCENARIO = ROOT / "scenarios" / "double_descent.toml"
FIELDS = ("width", "parameters", "noise", "seed", "test_error", "train_error", "wall_s")


def run_point(width: int, noise: float, seed: int, rounds: int | None, extra: list[str]) -> dict:
    """One run of the scenario at ``width`` and ``noise``: its final errors."""
    from fedsim.catalog import resolve
    from fedsim.config import load_scenario
    from fedsim.data.federation import federation_of
    from fedsim.engines.local import run_local
    from fedsim.models import count_parameters
    from fedsim.results import read_jsonl

    sets = [f"model.hidden=[{width}]", f"data.label_noise={noise}", f"run.seed={seed}", "run.progress=false",
            "run.checkpoint_every=0", *extra]
    if rounds:
        sets.append(f"run.rounds={rounds}")
    s = resolve(load_scenario(str(SCENARIO), sets))
    fed = federation_of(s)
    params = count_parameters(s.model, tuple(fed.input_shape), fed.num_classes)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        summary = run_local(s, Path(d) / "run")
        if summary["status"] != "completed":
            raise RuntimeError(f"width {width} noise {noise} seed {seed}: {summary['status']}")
        last = [r for r in read_jsonl(Path(d) / "run" / "metrics.jsonl") if r.get("round", 0) >= 1][-1]
    return {"width": width, "parameters": params, "noise": noise, "seed": seed,
            "test_error": 1.0 - float(last["test_accuracy"]), "train_error": 1.0 - float(last["train_accuracy"]),
            "wall_s": round(time.perf_counter() - t0, 2)}


def table(rows: list[dict]) -> str:
    """Markdown: mean (± std over seeds) test and training error per width, one column pair per noise level."""
    noises = sorted({r["noise"] for r in rows})
    widths = sorted({r["width"] for r in rows})
    head = ["width", "parameters"] + [f"{k} (noise {q:g})" for q in noises for k in ("test error", "train error")]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in widths:
        cells = [str(w), str(next(r["parameters"] for r in rows if r["width"] == w))]
        for q in noises:
            for key in ("test_error", "train_error"):
                vals = [r[key] for r in rows if r["width"] == w and r["noise"] == q]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}" if vals else "")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for q in sorted({r["noise"] for r in rows}):
        widths = sorted({r["width"] for r in rows if r["noise"] == q})
        for key, style in (("test_error", "-o"), ("train_error", "--x")):
            means = [statistics.mean(r[key] for r in rows if r["width"] == w and r["noise"] == q) for w in widths]
            ax.plot(widths, means, style, label=f"{key.replace('_', ' ')}, noise {q:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden width (MLP, one hidden layer)")
    ax.set_ylabel("error")
    ax.set_title("double descent · digits · fedavg")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", nargs="*", type=int, default=[2, 4, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--noise", nargs="*", type=float, default=[0.0, 0.2])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--rounds", type=int, default=None, help="cap run.rounds (default: the scenario's)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more --set items for every run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "double_descent")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for q in args.noise:
        for w in args.widths:
            for seed in args.seeds:
                rows.append(run_point(w, q, seed, args.rounds, args.extra))
                r = rows[-1]
                print(f"width {w:4d} noise {q:g} seed {seed}: test error {r['test_error']:.4f}, "
                      f"train error {r['train_error']:.4f} ({r['wall_s']:.0f} s)", file=sys.stderr)
    with open(args.out / "double_descent.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows)
    (args.out / "double_descent.md").write_text(text + "\n")
    plot(rows, args.out / "double_descent.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
