"""Curves of compared runs: per group, the mean of a metric per round and a ± one standard deviation band.

Drawn from the groups :func:`fedsim.experiments.compare` makes (runs of one setting over seeds). A
round is drawn for a group only where every run of the group has the metric (``run.eval_every``
rounds, round 0 = the initial model); the band is the sample standard deviation (ddof = 1) across the
seeds, absent for a single run. One panel per metric, on Matplotlib's Agg canvas (headless).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def curve(runs: list[Any], metric: str) -> tuple[list[int], list[float], list[float]]:
    """Rounds where every run has ``metric``, the mean there and the std (0 for a single run)."""
    per_run = [{int(r["round"]): float(r[metric]) for r in run.rows
                if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)} for run in runs]
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    means = [statistics.fmean(p[t] for p in per_run) for t in rounds]
    stds = [statistics.stdev(p[t] for p in per_run) if len(per_run) > 1 else 0.0 for t in rounds]
    return rounds, means, stds


def draw_comparison(groups: list[Any], metrics: list[str], title: str) -> Any:
    """A figure with one panel per metric: mean curve and ± std band of every group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, (3.0 + 0.18 * len(groups)) * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(len(metrics), 1, i + 1)
        for k, g in enumerate(groups):
            rounds, means, stds = curve(g.runs, metric)
            color = f"C{k % 10}"
            label = g.label if len(g.label) <= 70 else g.label[:67] + "..."
            ax.plot(rounds, means, color=color, marker="o", ms=3, label=f"{label} (n={len(g.runs)})")
            ax.fill_between(rounds, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=color, alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}, mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18), frameon=False)
    return fig


def save_comparison(groups: list[Any], metrics: list[str], title: str, path: str | Path) -> Path:
    """Draw :func:`draw_comparison` to ``path`` (PNG); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_comparison(groups, metrics, title).savefig(path, dpi=110)
    return path
