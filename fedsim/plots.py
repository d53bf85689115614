"""Plots of a run directory, drawn from its saved files (so ``fedsim plot RUN_DIR`` can redraw them).

Every figure is a Matplotlib ``Figure`` on the Agg canvas (headless, no global backend change, no
``pyplot``); the ``draw_*`` functions return it so tests can read its axes. The one-axes figures have
fixed margins (:data:`MARGINS`) instead of a layout engine: a layout engine makes ``savefig`` draw
every figure twice (once to measure, once to render), which was most of a short run's plotting time.
Run plots are titled with the scenario's ``run.name`` and ``strategy.name`` (from ``config.toml``;
:func:`_title` keeps a long title whole) and have integer round ticks. The ε plot
draws one curve per mechanism, each in its own colour, line style and marker (mechanisms with the
very same ε every round, such as the two released counters, share one curve named after both), the
total, and the budget ``privacy.max_epsilon`` (and ``privacy.target_epsilon``) as horizontal lines.
"""

from __future__ import annotations

import json
import math
import statistics
import tomllib
from pathlib import Path
from typing import Any

from fedsim.plots_diagnostics import diagnostics_figures
from fedsim.results import read_jsonl

#: a reported ε at or above this is ε = ∞ (the ledger writes 1e300 for an unbounded ε)
INFINITE_EPSILON = 1e100
_STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P")]
#: participation groups: label, clients.jsonl statuses, and whether a dropout (faults.dropout) is meant
PARTICIPATION = (("replied", ("ok",)), ("sat out / straggler", ("sat-out", "straggler")),
                 ("dropped out", ("error",)), ("failed (crash, error, timeout, invalid)", ("error", "timeout",
                                                                                           "invalid")))


#: margins around the axes in inches: the title (and an axis offset such as ``1e100``) above, the tick
#: labels and axis label below and to the left (tick labels up to about seven characters wide)
MARGINS = {"left": 0.85, "right": 0.15, "bottom": 0.52, "top": 0.5}


def _figure(width: float = 5.4, height: float = 3.4) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = MARGINS
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width, bottom=m["bottom"] / height,
                        top=1 - m["top"] / height)
    FigureCanvasAgg(fig)
    return fig


def _title(ax: Any, text: str) -> None:
    """Title ``ax``; a title wider than the figure is broken onto two lines (if one line would need a font
    under 8 pt) and set smaller until it fits, so it is never cut off (one text measured, no layout pass)."""
    title = ax.set_title(text)
    fig = ax.get_figure()
    renderer = fig.canvas.get_renderer()
    centre = (ax.bbox.x0 + ax.bbox.x1) / 2
    room = 2 * min(centre, fig.bbox.width - centre) - 6  # pixels, centred over the axes
    size = title.get_fontsize()
    width = title.get_window_extent(renderer).width
    if width <= room:
        return
    if size * room / width < 8.0 and " " in text:  # break at the space nearest the middle
        cut = min((i for i, ch in enumerate(text) if ch == " "), key=lambda i: abs(i - len(text) / 2))
        title.set_text(text[:cut] + "\n" + text[cut + 1:])
        width = title.get_window_extent(renderer).width
    title.set_fontsize(size * min(1.0, room / width))


def _round_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def run_title(config: dict[str, Any]) -> str:
    """``<run.name> · <strategy.name>`` from a run's ``config.toml`` (as a dict)."""
    return f"{config.get('run', {}).get('name', 'run')} · {config.get('strategy', {}).get('name', '?')}"


def is_dropout(record: dict[str, Any]) -> bool:
    """A clients.jsonl record of a client that left the round by the fault model (``faults.dropout``:
    ``fedsim.faults.ClientDropout``), not a crash or an error."""
    reason = str(record.get("reason") or "")
    return record.get("status") == "error" and ("ClientDropout" in reason or "dropped out of round" in reason)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def draw_metric(rows: list[dict], key: str, label: str, title: str) -> Any:
    """``key`` per round (with the clients' train loss beside the test loss)."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(*_series(rows, key), marker="o", ms=3, label=label)
    if key == "test_loss":
        ax.plot(*_series(rows, "train_loss"), marker=".", ms=3, ls="--", label="train loss (clients)")
    _round_axis(ax)
    ax.set_ylabel(label.replace("test loss", "loss"))
    _title(ax, f"{title}: {label}")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def draw_participation(clients: list[dict], title: str) -> Any:
    """Clients per round that replied, sat out, dropped out (``faults.dropout``) or failed."""
    counts: dict[str, dict[int, int]] = {label: {} for label, _ in PARTICIPATION}
    for c in clients:
        if c.get("client") is None:
            continue
        dropped = is_dropout(c)
        for label, statuses in PARTICIPATION:
            if c.get("status") in statuses and (label == "dropped out") == dropped:
                counts[label][c["round"]] = counts[label].get(c["round"], 0) + 1
                break
    rounds = sorted(set().union(*counts.values()))
    fig = _figure()
    ax = fig.add_subplot()
    bottom = [0] * len(rounds)
    for label, _ in PARTICIPATION:
        vals = [counts[label].get(r, 0) for r in rounds]
        if any(vals):
            ax.bar(rounds, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
    _round_axis(ax)
    ax.set_ylabel("clients")
    ax.set_ylim(0, max(bottom + [1]) * 1.35)
    _title(ax, f"{title}: participation")
    if rounds:
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    return fig


def draw_epsilon(privacy: list[dict], title: str, budget: float = 0.0, target: float = 0.0) -> Any:
    """ε(δ) per round: one curve per mechanism (identical ones merged), the total, the budget line."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for mech in dict.fromkeys(p.get("mechanism", "total") for p in privacy):
        pts = [(p["round"], min(p["epsilon"], INFINITE_EPSILON)) for p in privacy if p.get("mechanism") == mech]
        series[mech] = ([a for a, _ in pts], [b for _, b in pts])
    merged: dict[tuple, list[str]] = {}
    for mech, (xs, ys) in series.items():
        merged.setdefault((tuple(xs), tuple(ys)), []).append(mech)
    fig = _figure()
    ax = fig.add_subplot()
    for k, ((xs, ys), names) in enumerate(sorted(merged.items(), key=lambda kv: "total" in kv[1])):
        label = " = ".join("dp-sgd (worst client)" if n == "dp-sgd" else n for n in names)
        if "total" in names:
            ax.plot(xs, ys, color="black", lw=2, marker="o", ms=3, label=label, zorder=3)
        else:
            ls, marker = _STYLES[k % len(_STYLES)]
            ax.plot(xs, ys, ls=ls, marker=marker, ms=4, label=label)
    if budget:
        ax.axhline(budget, color="red", ls="--", lw=1, label=f"budget ε = {budget:g} (privacy.max_epsilon)")
    if target:
        ax.axhline(target, color="green", ls=":", lw=1, label=f"target ε = {target:g} (privacy.target_epsilon)")
    _round_axis(ax)
    delta = next((p.get("delta") for p in privacy if p.get("delta")), None)
    ax.set_ylabel(f"ε (δ = {delta:g})" if delta else "ε")
    _title(ax, f"{title}: privacy spent")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _read_config(run: Path) -> dict[str, Any]:
    try:
        return tomllib.loads((run / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw accuracy, loss, participation (and ε for a private run) into ``RUN_DIR/plots``; return the files."""
    run = Path(run_dir)
    config = _read_config(run)
    title = run_title(config)
    rows = read_jsonl(run / "metrics.jsonl")
    out = run / "plots"
    out.mkdir(exist_ok=True)
    figures = {"accuracy.png": draw_metric(rows, "test_accuracy", "test accuracy", title),
               "loss.png": draw_metric(rows, "test_loss", "test loss", title),
               "participation.png": draw_participation(read_jsonl(run / "clients.jsonl"), title)}
    priv = read_jsonl(run / "privacy.jsonl")
    if priv:
        p = config.get("privacy", {})
        figures["epsilon.png"] = draw_epsilon(priv, title, float(p.get("max_epsilon", 0.0)),
                                              float(p.get("target_epsilon", 0.0)))
    figures.update(diagnostics_figures(read_jsonl(run / "clients.jsonl"), title))  # probe plugins' metrics
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
    return [out / name for name in figures]


def _utility_point(run: Path) -> tuple[str, float, float, float] | None:
    """``(mechanism, noise multiplier, final total ε, final test accuracy)`` of a run, or ``None``."""
    summary = json.loads((run / "summary.json").read_text())
    acc = summary.get("final", {}).get("test_accuracy")
    if acc is None:
        return None
    priv = read_jsonl(run / "privacy.jsonl")
    totals = [p["epsilon"] for p in priv if p.get("mechanism") == "total"]
    privacy = _read_config(run).get("privacy", {})
    mech = privacy.get("mechanism", "none")
    eps = totals[-1] if totals else math.inf
    return mech, float(privacy.get("noise_multiplier", 0.0)), math.inf if eps >= INFINITE_EPSILON else eps, acc


def draw_privacy_utility(run_dirs: list[str | Path]) -> Any:
    """Final accuracy against final total ε: every run as a small dot; per mechanism and noise multiplier
    the mean accuracy (error bar: ±1 std over seeds) at the runs' mean ε (error bar: their ε range), so
    a mean marker always sits among its runs; runs with ε = ∞ (non-private or no noise) as a dashed
    horizontal line at their mean accuracy (its legend entry is that line)."""
    groups: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for d in run_dirs:
        point = _utility_point(Path(d))
        if point is not None:
            mech, z, eps, acc = point
            groups.setdefault(mech, {}).setdefault(z, []).append((eps, acc))
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    for k, (mech, by_noise) in enumerate(sorted(groups.items())):
        finite = {z: xy for z, xy in sorted(by_noise.items()) if all(math.isfinite(e) for e, _ in xy)}
        infinite = [a for xy in by_noise.values() for e, a in xy if not math.isfinite(e)]
        colour = f"C{k}"
        if finite:
            xs = [statistics.mean(e for e, _ in xy) for xy in finite.values()]
            ys = [statistics.mean(a for _, a in xy) for xy in finite.values()]
            xerr = [[x - min(e for e, _ in xy) for x, xy in zip(xs, finite.values())],
                    [max(e for e, _ in xy) - x for x, xy in zip(xs, finite.values())]]
            yerr = [statistics.stdev([a for _, a in xy]) if len(xy) > 1 else 0.0 for xy in finite.values()]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, color=colour, label=mech)
            ax.scatter([e for xy in finite.values() for e, _ in xy], [a for xy in finite.values() for _, a in xy],
                       s=8, alpha=0.4, color=colour)
        if infinite:
            name = "non-private" if mech == "none" else f"{mech}, no noise"
            ax.axhline(statistics.mean(infinite), color=colour, ls="--", lw=1,
                       label=f"{name} (ε = ∞, {len(infinite)} run{'s' if len(infinite) > 1 else ''})")
    ax.set_xlabel("ε (total, at the run's δ)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"accuracy against privacy ({sum(len(v) for g in groups.values() for v in g.values())} runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_privacy_utility(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Save :func:`draw_privacy_utility` of ``run_dirs`` to ``out``."""
    out = Path(out)
    draw_privacy_utility(run_dirs).savefig(out, dpi=110)
    return out
