"""``fedsim sweep`` and ``fedsim compare``: run a grid of settings over seeds, compare runs over seeds.

The logic is in :mod:`fedsim.experiments` (imported inside the commands, so ``fedsim --help`` stays
light); :func:`register` adds the commands to fedsim's Typer app.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedsim.cli_options import Format, Quiet
from fedsim.errors import FedSimError, RunInterrupted

Grid = Annotated[list[str] | None, typer.Option(
    "--grid", "-g", help="key=v1,v2,… (TOML values; an inline table sets keys together: "
    "'strategy={name=\"fedavg\"},{name=\"fedprox\",mu=0.1}'); repeat for a Cartesian product")]
Seeds = Annotated[str, typer.Option("--seeds", help="comma-separated root seeds, each setting runs once per seed")]
Jobs = Annotated[int, typer.Option("--jobs", "-j", min=1, help="runs at a time, each in its own process")]


def sweep(
    scenario: Annotated[str, typer.Argument(help="scenario TOML file (or the name of a built-in one)")],
    grid: Grid = None,
    seeds: Seeds = "0",
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="override for every run: "
                                                   "section.key=value")] = None,
    jobs: Jobs = 1,
    out: Annotated[Path | None, typer.Option(help="sweep directory (default <run.output>/sweep-<run.name>); "
                                             "rerun the command to continue it")] = None,
    quiet: Quiet = False,
    fmt: Format = "text",
) -> None:
    """Run SCENARIO for every --grid combination × every seed (resumable, --jobs in parallel).

    Each run gets its own run directory under --out, indexed in sweep.json. Running the same command
    again skips completed runs, resumes interrupted ones and redoes stopped or failed ones."""
    from fedsim.config import load_scenario
    from fedsim.experiments import parse_grid, parse_seeds, plan_sweep, write_index
    from fedsim.results import safe_name

    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"fedsim: planning the sweep of {scenario}...")
    _quiet_flower()
    sets, specs = list(set_ or []), list(grid or [])
    base = load_scenario(scenario, sets)
    out = out if out is not None else Path(base.run.output) / f"sweep-{safe_name(base.run.name)}"
    plan = plan_sweep(scenario, parse_grid(specs), parse_seeds(seeds), sets, out)
    out.mkdir(parents=True, exist_ok=True)
    write_index(out, scenario, sets, specs, parse_seeds(seeds), plan)
    todo = [r for r in plan if r.action != "skip"]
    settings = len({r.setting for r in plan})
    say(f"sweep: {len(plan)} runs ({settings} settings × {len(plan) // settings} seeds) in {out}: "
        f"{len(plan) - len(todo)} completed before, {len(todo)} to run "
        f"({sum(r.action == 'resume' for r in todo)} resumed, {sum(r.action == 'rerun' for r in todo)} redone)")
    failed: list[str] = []

    def done(k: int, run: Any, summary: dict[str, Any], seconds: float) -> None:
        status = summary.get("status")
        if status != "completed":
            failed.append(f"{run.dir.name} ({status}: {summary.get('error')})")
        acc = (summary.get("final") or {}).get("test_accuracy")
        shown = f", test_accuracy {acc:.4f}" if isinstance(acc, float) else ""
        say(f"[{k}/{len(todo)}] {run.label} seed {run.seed}: {status}{shown} ({seconds:.1f} s)")
        write_index(out, scenario, sets, specs, parse_seeds(seeds), plan)

    with _interruptible(out):
        if jobs == 1 or len(todo) <= 1:
            _sequential(todo, done)
        else:
            _parallel(todo, jobs, done)
    if fmt == "json":
        print((out / "sweep.json").read_text())
    else:
        say(f"sweep: {len(plan) - len(failed)} of {len(plan)} runs completed; compare them with: "
            f"fedsim compare {out}")
    if failed:
        raise FedSimError(f"{len(failed)} of {len(plan)} runs did not complete: {'; '.join(failed[:5])}",
                          "each run's summary.json and clients.jsonl say why; run the same command again to retry "
                          "them (completed runs are kept)")


def _sequential(todo: list[Any], done: Any) -> None:
    from fedsim.experiments import execute, read_summary

    for k, run in enumerate(todo, 1):
        t0 = time.perf_counter()
        try:
            summary = execute(run.scenario, run.dir, run.action)
        except Exception as err:  # noqa: BLE001 - reported per run (summary.json has it too); the sweep goes on
            kind = "stopped" if isinstance(err, FedSimError) else "failed"
            summary = {"status": read_summary(run.dir).get("status") or f"{kind}: {type(err).__name__}",
                       "error": str(err)}
        done(k, run, summary, time.perf_counter() - t0)


def _parallel(todo: list[Any], jobs: int, done: Any) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from fedsim.config import dumps_scenario
    from fedsim.experiments import execute_text

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(execute_text, dumps_scenario(r.scenario), str(r.dir), r.action): r for r in todo}
        for k, future in enumerate(as_completed(futures), 1):
            summary = future.result()
            done(k, futures[future], summary, float(summary.get("wall_time_s") or 0.0))
    except KeyboardInterrupt:
        # a signal to the sweep alone (kill PID; Ctrl-C reaches the workers itself): the workers' runs end
        # `interrupted` with their checkpoints, so the next sweep resumes them
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _interruptible(out: Path):
    """SIGINT/SIGTERM stop the sweep (the running run ends ``interrupted``) with the way to continue."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    except KeyboardInterrupt:
        raise RunInterrupted(f"sweep in {out} interrupted; completed runs are kept, run the same command again "
                             "to continue (an interrupted run resumes from its checkpoint)") from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _quiet_flower() -> None:
    import logging
    import os

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)


def compare(
    runs: Annotated[list[Path], typer.Argument(help="run directories, sweep directories (sweep.json) or "
                                               "directories of run directories")],
    metric: Annotated[list[str] | None, typer.Option("--metric", "-m", help="a metrics.jsonl column; "
                                                     "repeat for several (default test_accuracy)")] = None,
    round_: Annotated[str, typer.Option("--round", help="last | max | min | a round number")] = "last",
    plot: Annotated[Path | None, typer.Option(help="PNG of the curves (default: COMPARE_<metric>.png in "
                                              "the sweep directory when one sweep is given)")] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="draw no curves")] = False,
    fmt: Format = "text",
) -> None:
    """Mean ± std over seeds of a metric per setting among RUNS, and the curves with ± std bands.

    Runs whose config.toml differ only by the seed form one setting."""
    from fedsim.experiments import as_json, check_round, collect_runs, compare as compare_runs, table
    from fedsim.results import safe_name

    metrics, at = list(metric or ["test_accuracy"]), check_round(round_)
    records, order = collect_runs(runs)
    groups, notes = compare_runs(records, metrics, at, order)
    if plot is None and not no_plot and len(runs) == 1 and (runs[0] / "sweep.json").is_file():
        plot = runs[0] / f"compare_{'__'.join(safe_name(m) for m in metrics)}.png"
    if plot is not None and not no_plot:
        from fedsim.experiments_plot import save_comparison

        title = str(records[0].config.get("run", {}).get("name", "runs"))
        save_comparison(groups, metrics, title, plot)
    if fmt == "json":
        print(json.dumps({**as_json(groups, metrics, at, notes), "plot": None if no_plot else plot and str(plot)},
                         indent=2, default=str))
        return
    print(table(groups, metrics, at))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if plot is not None and not no_plot:
        print(f"wrote {plot}", file=sys.stderr)
    elif not no_plot:
        print("no plot: pass --plot FILE.png (drawn by default only for a single sweep directory)", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add ``sweep`` and ``compare`` to fedsim's command line."""
    app.command()(sweep)
    app.command("compare")(compare)
