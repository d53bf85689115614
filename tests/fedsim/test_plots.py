"""Plots read back from their Matplotlib axes: titles, integer round ticks, the ε plot's budget line and
distinct curves, dropouts apart from failures, and a privacy–utility plot whose marks sit on real runs."""

import json
import math

import tomli_w

from fedsim.engines.local import run_local
from fedsim.plots import (draw_epsilon, draw_metric, draw_participation, draw_privacy_utility, is_dropout,
                          plot_run, run_title)
from fedsim.results import read_jsonl
from tests.conftest import tiny

TITLE = run_title({"run": {"name": "my-study"}, "strategy": {"name": "fedprox"}})
ROWS = [{"round": r, "test_accuracy": 0.1 * r, "test_loss": 2.0 - 0.3 * r, "train_loss": 2.1 - 0.3 * r}
        for r in range(4)]


def _ticks_are_integers(fig) -> bool:
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def test_run_plots_are_titled_with_scenario_and_strategy_and_have_integer_round_ticks():
    assert TITLE == "my-study · fedprox"
    for fig in (draw_metric(ROWS, "test_accuracy", "test accuracy", TITLE),
                draw_metric(ROWS, "test_loss", "test loss", TITLE),
                draw_participation([{"round": r, "client": 0, "status": "ok"} for r in (1, 2, 3)], TITLE)):
        assert fig.axes[0].get_title().startswith("my-study · fedprox")
        assert _ticks_are_integers(fig)  # 3 rounds: Matplotlib alone would tick 1.0, 1.25, 1.5 …


def _privacy_rows(rounds=3):
    out = []
    for r in range(1, rounds + 1):
        out += [{"round": r, "mechanism": "dp-fedavg", "epsilon": 1.5 * r, "delta": 1e-5},
                {"round": r, "mechanism": "counter/participation", "epsilon": 0.5, "delta": 1e-5},
                {"round": r, "mechanism": "counter/label_histogram", "epsilon": 0.5, "delta": 1e-5},
                {"round": r, "mechanism": "total", "epsilon": 1.5 * r + 1.0, "delta": 1e-5}]
    return out


def test_the_epsilon_plot_has_the_budget_line_and_one_distinct_curve_per_mechanism():
    fig = draw_epsilon(_privacy_rows(), TITLE, budget=10.0, target=6.0)
    ax = fig.axes[0]
    assert ax.get_title().startswith(TITLE) and _ticks_are_integers(fig)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    budget = [ln for label, ln in lines.items() if label.startswith("budget")]
    assert len(budget) == 1 and set(budget[0].get_ydata()) == {10.0}
    assert any(label.startswith("target") for label in lines)
    # the two counters spend the same ε each round: one curve named after both, not two hidden on each other
    assert "counter/participation = counter/label_histogram" in lines
    curves = [ln for label, ln in lines.items() if not label.startswith(("budget", "target"))]
    assert len(curves) == 3
    styles = {(ln.get_linestyle(), ln.get_marker(), ln.get_color()) for ln in curves}
    assert len(styles) == len(curves)


def test_dp_sgd_curve_is_named_the_worst_client():
    rows = [{"round": 1, "mechanism": "dp-sgd", "epsilon": 2.0, "worst_client": 3, "delta": 1e-5},
            {"round": 1, "mechanism": "total", "epsilon": 2.5, "delta": 1e-5}]
    labels = [ln.get_label() for ln in draw_epsilon(rows, TITLE).axes[0].get_lines()]
    assert "dp-sgd (worst client)" in labels


def test_dropouts_are_not_counted_as_failed(tmp_path):
    s = tiny(["faults.dropout=0.5", "faults.crash_clients=[3]", 'run.on_failed_round="continue"',
              "run.quorum=0.0", "run.rounds=3"])
    run_local(s, tmp_path)
    clients = [c for c in read_jsonl(tmp_path / "clients.jsonl") if c.get("client") is not None]
    dropped = [c for c in clients if is_dropout(c)]
    crashed = [c for c in clients if c["status"] == "error" and not is_dropout(c)]
    assert dropped and crashed and all(c["client"] == 3 for c in crashed)
    ax = draw_participation(clients, TITLE).axes[0]
    heights = {}
    for container in ax.containers:
        heights[container.get_label()] = sum(bar.get_height() for bar in container)
    assert heights["dropped out"] == len(dropped)
    assert heights["failed (crash, error, timeout, invalid)"] == len(crashed)
    files = {f.name for f in plot_run(tmp_path)}
    assert files == {"accuracy.png", "loss.png", "participation.png"}


def _fake_run(path, mechanism, z, eps, acc):
    path.mkdir(parents=True)
    privacy = {"mechanism": mechanism} | ({"noise_multiplier": z} if mechanism != "none" else {})
    (path / "config.toml").write_text(tomli_w.dumps({"run": {"name": "x"}, "privacy": privacy}))
    (path / "summary.json").write_text(json.dumps({"final": {"test_accuracy": acc}}))
    lines = [] if eps is None else [{"round": 1, "mechanism": "total", "epsilon": eps}]
    (path / "privacy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_privacy_utility_marks_sit_on_runs_and_every_legend_entry_has_a_mark(tmp_path):
    runs = [_fake_run(tmp_path / "a0", "dp-fedavg", 1.0, 3.9, 0.80), _fake_run(tmp_path / "a1", "dp-fedavg", 1.0, 4.1,
                                                                                 0.82),
            _fake_run(tmp_path / "b0", "dp-fedavg", 2.0, 1.0, 0.60),  # 1.0 and 4.0 never average into 2.5
            _fake_run(tmp_path / "c0", "dp-fedavg", 0.0, 1e300, 0.90),  # no noise: ε = ∞
            _fake_run(tmp_path / "n0", "none", 0.0, None, 0.93), _fake_run(tmp_path / "n1", "none", 0.0, None, 0.95)]
    ax = draw_privacy_utility(runs).axes[0]
    handles, labels = ax.get_legend_handles_labels()
    assert len(labels) == 3 and "dp-fedavg" in labels
    means = ax.containers[0].lines[0]  # the error bar's data line: one mean per noise multiplier
    assert sorted(zip(means.get_xdata(), means.get_ydata())) == [(1.0, 0.6), (4.0, 0.81)]
    flat = {label: ln for label, ln in zip(labels, handles) if "ε = ∞" in label}
    assert set(flat) == {"dp-fedavg, no noise (ε = ∞, 1 run)", "non-private (ε = ∞, 2 runs)"}
    assert math.isclose(flat["non-private (ε = ∞, 2 runs)"].get_ydata()[0], 0.94)
    assert ax.get_title()
    assert _inside_canvas(ax.get_figure())  # (fixed margins: see below)


def _inside_canvas(fig) -> bool:
    """Everything drawn on the axes (title, labels, tick labels, an axis offset, the legend) lies inside
    the figure: the fixed margins that replace a layout engine cut nothing off."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box, canvas = fig.axes[0].get_tightbbox(renderer), fig.bbox
    return box.x0 >= canvas.x0 - 1 and box.y0 >= canvas.y0 - 1 and box.x1 <= canvas.x1 + 1 and box.y1 <= canvas.y1 + 1


def test_fixed_margins_cut_off_no_text_even_for_long_titles_and_wide_numbers():
    long = run_title({"run": {"name": "a-study-with-a-rather-long-name-" * 3}, "strategy": {"name": "fedprox"}})
    wide = [{"round": r, "test_accuracy": 0.1, "test_loss": 123456.7 / (r + 1), "train_loss": 1e-4 * r}
            for r in range(40)]
    infinite = [{"round": r, "mechanism": "total", "epsilon": 1e300 if r > 2 else 3.0, "delta": 1e-5}
                for r in range(1, 6)]
    figures = [draw_metric(ROWS, "test_accuracy", "test accuracy", TITLE),
               draw_metric(wide, "test_loss", "test loss", long),
               draw_participation([{"round": r, "client": c, "status": "ok"} for r in range(25) for c in range(120)],
                                  long),
               draw_epsilon(_privacy_rows(), long, budget=10.0, target=6.0),
               draw_epsilon(infinite, TITLE, budget=10.0)]
    for fig in figures:
        assert _inside_canvas(fig), fig.axes[0].get_title()
    # the long title is kept whole (set smaller, on two lines), not shortened
    assert figures[1].axes[0].get_title().replace("\n", " ") == f"{long}: test loss"
