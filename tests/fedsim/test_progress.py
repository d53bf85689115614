"""Run progress (``fedsim.progress``): one plain line per round off a terminal, a Rich bar on one,
nothing when quiet; the lines carry what the engines' rows really hold (ε of a private run)."""

from __future__ import annotations

import io
import re

from fedsim.progress import RunProgress, choose_mode, round_line

ROUND_LINE = re.compile(r"^round (\d+)/(\d+)  ")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_quiet_and_the_stream():
    assert choose_mode(False, _Tty()) == "bar"
    assert choose_mode(False, io.StringIO()) == "lines"
    assert choose_mode(True, _Tty()) == "off" and choose_mode(True, io.StringIO()) == "off"


def test_lines_mode_prints_status_then_exactly_one_line_per_round():
    out = io.StringIO()
    progress = RunProgress("lines", out)
    progress.status("building the federation (digits, 4 clients)...")
    with progress.rounds("tiny [local]", total=3) as on_round:
        on_round(0, {"round": 0, "test_accuracy": 0.1, "test_loss": 2.3})
        for rnd in (1, 2, 3):
            on_round(rnd, {"round": rnd, "test_accuracy": 0.5, "test_loss": 1.0, "wall_s": 0.5, "epsilon": 1.25})
    lines = out.getvalue().splitlines()
    assert lines[0] == "fedsim: building the federation (digits, 4 clients)..."
    assert lines[1] == "fedsim: initial model: accuracy 0.1000, loss 2.3000; training round 1 of 3..."
    assert [ROUND_LINE.match(x).groups() for x in lines[2:]] == [("1", "3"), ("2", "3"), ("3", "3")]
    assert lines[2] == "round 1/3  accuracy 0.5000  loss 1.0000  epsilon 1.25  0.50 s"


def test_a_resumed_run_says_where_it_continues_and_a_failed_round_says_so():
    out = io.StringIO()
    with RunProgress("lines", out).rounds("r", total=4) as on_round:
        on_round(2, {"round": 2, "test_accuracy": 0.7, "test_loss": 0.9})
        on_round(3, {"round": 3, "wall_s": 0.1, "round-failed": 1})
    first, line = out.getvalue().splitlines()
    assert first.startswith("fedsim: resumed after round 2: accuracy 0.7000") and "round 3 of 4" in first
    assert line.startswith("round 3/4  FAILED") and line.endswith("0.10 s")


def test_off_prints_nothing_even_after_being_started():
    out = io.StringIO()
    progress = RunProgress("lines", out)
    with progress.rounds("r", total=2) as on_round:
        progress.disable()
        progress.status("building...")
        on_round(0, {"round": 0})
        on_round(1, {"round": 1})
    assert out.getvalue() == ""


def test_bar_mode_draws_a_rich_bar_on_a_terminal():
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    progress = RunProgress("bar", buf, console=console)
    progress.status("building the federation...")
    with progress.rounds("tiny [local]", total=2) as on_round:
        on_round(0, {"round": 0, "test_accuracy": 0.1})
        on_round(1, {"round": 1, "test_accuracy": 0.5})
        on_round(2, {"round": 2, "test_accuracy": 0.75})
    text = buf.getvalue()
    assert "building the federation" in text and "tiny [local]" in text and "2/2" in text
    assert "accuracy 0.7500" in text and "━" in text                       # the bar itself
    assert not any(ROUND_LINE.match(x) for x in text.splitlines())


def test_a_private_round_line_reports_the_total_epsilon_the_ledger_writes_in_the_row():
    """The server adds ``PrivacyLedger.round_metrics`` to each private round's row: its total ε must
    reach the line (and a mechanism's own ε, a per-mechanism key, must not be taken for the total)."""
    from fedsim.privacy.ledger import PrivacyLedger

    records = [{"round": 1, "mechanism": "dp-fedavg", "epsilon": 1.5},
               {"round": 1, "mechanism": "counter/participation", "epsilon": 0.25},
               {"round": 1, "mechanism": "total", "epsilon": 1.75}]
    row = {"round": 1, "test_accuracy": 0.5, "wall_s": 0.2, **PrivacyLedger([], 1e-5, 0.0).round_metrics(records)}
    assert round_line(1, 5, row) == "round 1/5  accuracy 0.5000  epsilon 1.75  0.20 s"


def test_round_line_skips_what_a_round_did_not_measure():
    assert round_line(4, 10, {"round": 4, "wall_s": 1.234}) == "round 4/10  1.23 s"  # eval_every skipped it
