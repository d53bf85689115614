"""Progress of a run on stderr: a Rich bar on a terminal, one plain line per round anywhere else.

Under nohup, SLURM, CI or a pipe there is no terminal to redraw a bar on, so each finished round
prints one line (round, test accuracy, test loss, ε of a private run, seconds); on a terminal a
Rich bar shows the same. Before round 1 a status line says what is being built (the scenario's
imports, the federation, the model and its round-0 evaluation), so the screen never stays blank
while a run starts. ``--quiet`` (or ``run.progress = false``) prints none of it; errors and the
summary are printed whatever the setting. Issue 14 §7.

Examples
--------
>>> import io
>>> out = io.StringIO()
>>> progress = RunProgress("lines", out)
>>> with progress.rounds("default [local]", total=2) as on_round:
...     on_round(0, {"round": 0, "test_accuracy": 0.1, "test_loss": 2.3})
...     on_round(1, {"round": 1, "test_accuracy": 0.5, "test_loss": 1.5, "wall_s": 0.25})
>>> print(out.getvalue().splitlines()[-1])
round 1/2  accuracy 0.5000  loss 1.5000  0.25 s
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, Literal, TextIO

__all__ = ["Mode", "RoundCallback", "RunProgress", "choose_mode", "round_fields", "round_line"]

Mode = Literal["bar", "lines", "off"]
#: called with (round, metrics row) after each round; first with the row the run starts from
RoundCallback = Callable[[int, dict[str, Any]], None]


def choose_mode(quiet: bool, stream: TextIO) -> Mode:
    """``"off"`` when quiet, ``"bar"`` when ``stream`` is a terminal, else ``"lines"``."""
    if quiet:
        return "off"
    isatty = getattr(stream, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "lines"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def round_fields(row: dict[str, Any]) -> list[str]:
    """The metrics of one ``metrics.jsonl`` row worth a glance: test accuracy and loss (rounds that
    were evaluated), the total ε of a private run, and whether the round failed."""
    parts = []
    if _number(row.get("test_accuracy")):
        parts.append(f"accuracy {row['test_accuracy']:.4f}")
    if _number(row.get("test_loss")):
        parts.append(f"loss {row['test_loss']:.4f}")
    if _number(row.get("epsilon")):
        parts.append(f"epsilon {row['epsilon']:.4g}")
    if row.get("round-failed"):
        parts.append("FAILED (no valid reply, or below run.quorum)")
    return parts


def round_line(rnd: int, total: int, row: dict[str, Any]) -> str:
    """One finished round as a plain line: ``round 3/20  accuracy 0.8123  loss 0.5321  0.41 s``."""
    parts = [f"round {rnd}/{total}", *round_fields(row)]
    if _number(row.get("wall_s")):
        parts.append(f"{row['wall_s']:.2f} s")
    return "  ".join(parts)


class RunProgress:
    """Status lines and per-round progress of one run, written to ``stream`` (stderr by default).

    Parameters
    ----------
    mode
        ``"bar"`` (Rich, for a terminal), ``"lines"`` (one line per round) or ``"off"``.
    stream
        Where to write; a Rich console on it is made for ``"bar"`` unless ``console`` is given.
    console
        A ``rich.console.Console`` to draw the bar on (tests pass one writing to a buffer).
    """

    def __init__(self, mode: Mode, stream: TextIO | None = None, console: Any = None) -> None:
        self.mode: Mode = mode
        self.stream = stream if stream is not None else sys.stderr
        self._console = console

    @classmethod
    def for_stderr(cls, quiet: bool) -> RunProgress:
        """The progress of a command: a bar when stderr is a terminal, lines otherwise, none if quiet."""
        return cls(choose_mode(quiet, sys.stderr), sys.stderr)

    def disable(self) -> None:
        """Print nothing from now on (``run.progress = false``)."""
        self.mode = "off"

    def status(self, message: str) -> None:
        """One line saying what the run is doing now (``fedsim: building the federation ...``)."""
        if self.mode == "lines":
            print(f"fedsim: {message}", file=self.stream, flush=True)
        elif self.mode == "bar":
            from rich.markup import escape

            self._rich().print(f"[dim]fedsim: {escape(message)}[/dim]", soft_wrap=True)

    @contextlib.contextmanager
    def rounds(self, title: str, total: int) -> Iterator[RoundCallback]:
        """Yield the round callback of an engine for a run of ``total`` rounds.

        Its first call brings the row the run starts from (round 0's evaluation, or the round a
        resumed run continues after) and announces the next round; every later call is a finished
        round: one line in ``"lines"`` mode, the bar advanced in ``"bar"`` mode.
        """
        if self.mode != "bar":
            yield self._lines_callback(total)
            return
        from rich.markup import escape
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       console=self._rich(), transient=False)
        with bar:
            task = bar.add_task(escape(title), total=total, info="")  # "name [engine]" is not markup
            seen: list[int] = []

            def on_round(rnd: int, row: dict[str, Any]) -> None:
                if self.mode == "off":
                    return
                first = not seen
                seen.append(rnd)
                info = "  ".join(round_fields(row))
                if first and rnd < total:
                    info = f"{info}  round {rnd + 1}...".strip()
                bar.update(task, completed=rnd, info=escape(info))

            yield on_round

    def _lines_callback(self, total: int) -> RoundCallback:
        seen: list[int] = []

        def on_round(rnd: int, row: dict[str, Any]) -> None:
            if self.mode == "off":
                return
            first = not seen
            seen.append(rnd)
            if not first:
                print(round_line(rnd, total, row), file=self.stream, flush=True)
                return
            start = "initial model" if rnd == 0 else f"resumed after round {rnd}"
            fields = ", ".join(round_fields(row))
            following = f"; training round {rnd + 1} of {total}..." if rnd < total else ""
            self.status(f"{start}{': ' + fields if fields else ''}{following}")

        return on_round

    def _rich(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stream)
        return self._console
