"""Plots of a run directory, drawn from its saved files (so ``fedsim plot RUN_DIR`` can redraw them)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.results import read_jsonl  # noqa: E402


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw accuracy, loss and participation per round into ``RUN_DIR/plots``; return the files."""
    run = Path(run_dir)
    rows = read_jsonl(run / "metrics.jsonl")
    clients = read_jsonl(run / "clients.jsonl")
    out = run / "plots"
    out.mkdir(exist_ok=True)
    files = []
    for key, label, fname in (("test_accuracy", "test accuracy", "accuracy.png"),
                              ("test_loss", "test loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(*_series(rows, key), marker="o", ms=3, label=label)
        if key == "test_loss":
            ax.plot(*_series(rows, "train_loss"), marker=".", ms=3, label="train loss (clients)")
        ax.set_xlabel("round")
        ax.set_ylabel(label.replace("test loss", "loss"))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(out / fname)
    groups = (("replied", {"ok"}), ("sat out / straggler", {"sat-out", "straggler"}),
              ("failed", {"error", "timeout", "invalid"}))
    counts = {label: Counter(c["round"] for c in clients if c.get("status") in kinds and c.get("client") is not None)
              for label, kinds in groups}
    rounds = sorted(set().union(*counts.values()))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bottom = [0] * len(rounds)
    for label, _ in groups:
        vals = [counts[label][r] for r in rounds]
        if any(vals):
            ax.bar(rounds, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("round")
    ax.set_ylabel("clients")
    ax.set_ylim(0, max(bottom + [1]) * 1.3)
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "participation.png", dpi=110)
    plt.close(fig)
    files.append(out / "participation.png")
    priv = read_jsonl(run / "privacy.jsonl")
    if priv:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for mech in sorted({p.get("mechanism", "total") for p in priv}):
            pts = [(p["round"], p["epsilon"]) for p in priv if p.get("mechanism", "total") == mech]
            label = "dp-sgd (worst client)" if mech == "dp-sgd" else mech
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("ε")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "epsilon.png", dpi=110)
        plt.close(fig)
        files.append(out / "epsilon.png")
    return files


def plot_privacy_utility(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Final test accuracy against final total ε, one point per run, one series per mechanism."""
    import json

    pts: dict[str, list[tuple[float, float]]] = {}
    for d in run_dirs:
        run = Path(d)
        summary = json.loads((run / "summary.json").read_text())
        priv = read_jsonl(run / "privacy.jsonl")
        totals = [p for p in priv if p.get("mechanism") == "total"]
        mech = next((p["mechanism"] for p in priv if p.get("mechanism") not in ("total",)
                     and not str(p.get("mechanism")).startswith("counter")), "none")
        eps = totals[-1]["epsilon"] if totals else float("inf")
        acc = summary.get("final", {}).get("test_accuracy")
        if acc is not None:
            pts.setdefault(mech, []).append((eps, acc))
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for mech, xy in sorted(pts.items()):
        groups: dict[float, list[float]] = {}
        for x, y in xy:  # runs that differ only by seed share ε (up to participation): average them
            groups.setdefault(round(x, 1), []).append(y)
        xs = sorted(groups)
        means = [sum(groups[x]) / len(groups[x]) for x in xs]
        errs = [(max(groups[x]) - min(groups[x])) / 2 for x in xs]
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=mech)
        ax.scatter([x for x, _ in xy], [y for _, y in xy], s=8, alpha=0.4, color=ax.lines[-1].get_color())
    ax.set_xlabel("ε (total, at the run's δ)")
    ax.set_ylabel("final test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
