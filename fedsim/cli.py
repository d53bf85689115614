"""``fedsim`` command line: run, resume, list, plot, partition, deploy, sweep, compare, privacy; ``--version``.

User errors (:class:`~fedsim.errors.FedSimError`) print one line and a hint on stderr and exit with
the error's code; no traceback. ``--format json`` prints machine-readable output on stdout.
``run`` and ``resume`` report progress on stderr (:mod:`fedsim.progress`: a bar on a terminal, one
line per round otherwise, nothing with ``--quiet``). Only what a command uses is imported, inside
it, so ``fedsim --help`` and ``fedsim list`` start fast (``tests/test_imports.py``).
A run stopped by SIGINT or SIGTERM prints one line (``interrupted: …``, with the ``fedsim resume``
command when the run can be continued) and exits with 130; its ``summary.json`` says ``interrupted``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedsim.cli_options import ClientAppName, Format, Quiet, keep_argument_help
from fedsim.errors import FedSimError, RunInterrupted
from fedsim.progress import RunProgress

app = typer.Typer(no_args_is_help=True, add_completion=False, context_settings={"help_option_names": ["-h", "--help"]},
                  help="fedsim: federated and privacy-preserving learning simulator (Flower + PyTorch).")
err_console = Console(stderr=True)
console = Console()
keep_argument_help()

Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace the run already in --out (else refused)")]


def _version(value: bool) -> None:
    """``--version``: fedsim's version and those of the Flower and PyTorch it runs on (read from the
    installed packages' metadata, so nothing heavy is imported)."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from fedsim import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    print(f"fedsim {__version__} (flwr {installed('flwr')}, torch {installed('torch')}, "
          f"Python {sys.version.split()[0]})")
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="print the versions of fedsim, flwr and torch and exit")] = None,
) -> None:
    """fedsim: federated and privacy-preserving learning simulator (Flower + PyTorch)."""


def _quiet_flower() -> None:
    """Telemetry and update checks off; Flower's and Ray's loggers at WARNING (the progress is ours).
    Importing Flower's logger sets it to DEBUG, so the level is lowered after that import."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.WARNING)


_FROZEN: list[bool] = []  # whether _start_up froze the start-up objects


@contextlib.contextmanager
def _start_up():
    """No garbage collection while a command imports Flower, PyTorch and the registries, then
    ``gc.freeze()`` (once per process; nested uses do nothing): those ~10^5 long-lived objects hold no
    garbage, yet full collections over them took ≈0.8 s of `fedsim run scenarios/default.toml`, and
    every later full collection of the run would scan them again (issue 13)."""
    if _FROZEN or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        _FROZEN.append(True)
        gc.freeze()
        gc.enable()


def _load(scenario: str, sets: list[str] | None, **direct: Any):
    """Load, validate and resolve a scenario (every name checked before anything runs)."""
    with _start_up():
        from fedsim.catalog import resolve
        from fedsim.config import load_scenario

        overrides = list(sets or [])
        for key, value in direct.items():
            if value is not None:
                overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
        return resolve(load_scenario(scenario, overrides))


@app.command()
def run(
    scenario: Annotated[str, typer.Argument(help="scenario TOML file (or the name of a built-in one)")],
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="override: section.key=value")] = None,
    engine: Annotated[str | None, typer.Option(help="local | ray | deploy")] = None,
    seed: Annotated[int | None, typer.Option(help="root seed")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<name>-<time>-s<seed>)")] = None,
    overwrite: Overwrite = False,
    client_app: ClientAppName = None,
    quiet: Quiet = False,
    fmt: Format = "text",
) -> None:
    """Simulate a federation described by SCENARIO."""
    progress = RunProgress.for_stderr(quiet)
    shown = str(scenario).encode("unicode_escape").decode("ascii")  # one line, whatever the name holds
    progress.status(f"loading {shown} (Flower, PyTorch, the registries)...")
    with _start_up():
        _quiet_flower()
        scen = _load(scenario, set_, **{"run.engine": engine, "run.seed": seed, "run.client_app": client_app})
    out_dir = _out_dir(scen, out, overwrite)
    with _interruptible(scen, out_dir):
        summary = _execute(scen, out_dir, progress)
    _report(summary, fmt)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `fedsim run` (local engine)")],
    quiet: Quiet = False,
    fmt: Format = "text",
) -> None:
    """Continue the run in RUN_DIR from its latest checkpoint up to the run.rounds of its config.toml.

    Model, strategy state, privacy ledger and every client's state come back from the checkpoint;
    lines written after it are dropped and redone, so the result is the uninterrupted run's."""
    progress = RunProgress.for_stderr(quiet)
    progress.status(f"loading {run_dir / 'config.toml'} and its latest checkpoint...")
    _quiet_flower()
    from fedsim.errors import ConfigError
    from fedsim.results import resume_point

    if not (run_dir / "config.toml").is_file():
        raise FedSimError(f"{run_dir} has no config.toml", "pass a directory written by `fedsim run`")
    scen = _load(str(run_dir / "config.toml"), None)
    if scen.run.engine != "local":
        raise ConfigError("run.engine", f"resume continues runs of the local engine only; {run_dir} ran on "
                          f"'{scen.run.engine}'", "start the run again with `fedsim run`")
    resume_point(run_dir, scen)  # refuse a missing, corrupted or mismatched checkpoint before anything runs
    with _interruptible(scen, run_dir):
        summary = _execute(scen, run_dir, progress, resume=True)
    _report(summary, fmt)


def _out_dir(scen, out: Path | None, overwrite: bool) -> Path:
    from fedsim.results import prepare_out_dir
    from fedsim.server import default_run_dir

    return prepare_out_dir(out, overwrite) if out is not None else default_run_dir(scen)


def _report(summary: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary)


@contextlib.contextmanager
def _interruptible(scen, out_dir: Path):
    """SIGINT and SIGTERM stop the run (``KeyboardInterrupt`` naming the signal, so the run loop writes
    ``interrupted``) and become :class:`RunInterrupted` (exit code 130) with the way to continue."""
    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    except KeyboardInterrupt as err:
        _drop_if_empty(out_dir)
        raise _interrupted(err, scen, out_dir) from None
    except BaseException:
        _drop_if_empty(out_dir)  # refused before anything was written: leave no empty run directory
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _drop_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _interrupted(err: KeyboardInterrupt, scen, out_dir: Path) -> RunInterrupted:
    """The one line an interrupted run prints: signal, last round written, how to continue."""
    summary: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((Path(out_dir) / "summary.json").read_text())
    sig = str(err.args[0]) if err.args else "SIGINT"
    if not summary:
        return RunInterrupted(f"{sig} before the first round was written; nothing to resume")
    resumable = scen.run.engine == "local" and (Path(out_dir) / "checkpoints" / "latest.json").exists()
    how = (f"continue it with: fedsim resume {out_dir}" if resumable
           else "it cannot be resumed (local engine runs with a checkpoint only)")
    return RunInterrupted(f"{sig} after round {summary.get('rounds_completed')} of {scen.run.rounds}; {out_dir} "
                          f"holds everything up to then; {how}")


def _execute(scen, out_dir: Path, progress: RunProgress, resume: bool = False, client_app=None) -> dict[str, Any]:
    """Run ``scen`` on its engine, reporting on ``progress`` (off when ``run.progress = false``);
    ``client_app``: a ClientApp object to serve as the clients (local and Ray engines; a name goes into
    ``run.client_app``, which every engine honours)."""
    if client_app is not None and scen.run.engine == "deploy":
        from fedsim.errors import ConfigError

        raise ConfigError("client_app", "a ClientApp object cannot reach the deployment's SuperNode processes",
                          "name it instead: client_app=\"module:object\" (run.client_app), importable there")
    if not scen.run.progress:
        progress.disable()
    engine, d = scen.run.engine, scen.data
    what = (f"the federation ({d.dataset}, {d.num_clients} clients, {d.partitioner} partition) and the model "
            f"({scen.model.name}), evaluating round 0")
    if engine == "local":
        progress.status(f"building {what}...")
    elif engine == "ray":
        progress.status(f"starting Ray, building {what}...")
    else:
        progress.status(f"starting a SuperLink and {scen.deploy.nodes} SuperNodes on 127.0.0.1 (this engine "
                        "reports its rounds when the run ends)...")
    with progress.rounds(f"{scen.run.name} [{engine}]", scen.run.rounds) as on_round:
        if engine == "local":
            from fedsim.engines.local import run_local

            return run_local(scen, out_dir, on_round, resume=resume, client_app=client_app)
        if engine == "ray":
            from fedsim.engines.ray import run_ray

            return run_ray(scen, out_dir, on_round, client_app=client_app)
        from fedsim.engines.deploy import run_deploy

        return run_deploy(scen, out_dir, nodes=scen.deploy.nodes)


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"fedsim run — {summary.get('status')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("rounds_completed", "strategy", "seed", "wall_time_s"):
        table.add_row(key, str(summary.get(key)))
    if summary.get("failed_rounds"):
        table.add_row("failed_rounds", f"{len(summary['failed_rounds'])}: {summary['failed_rounds'][:10]}")
    if summary.get("resumed_from") is not None:
        table.add_row("resumed_from", str(summary["resumed_from"]))
    for key, value in sorted(summary.get("final", {}).items()):
        table.add_row(f"final {key}", f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("run_dir", str(summary.get("run_dir")))
    console.print(table)


@app.command("list")
def list_(fmt: Format = "text") -> None:
    """List strategies, plugins, partitioners, datasets, models and built-in scenarios."""
    from fedsim.catalog import builtin_scenarios, registries

    data = {kind: reg.names() for kind, reg in registries().items()}
    data["scenarios"] = [p.name for p in builtin_scenarios()]
    if fmt == "json":
        print(json.dumps(data, indent=2))
        return
    for kind, names in data.items():
        console.print(f"[bold]{kind}[/bold]: {', '.join(names)}")


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Redraw a run's plots from its saved files."""
    from fedsim.plots import plot_run

    if not (run_dir / "metrics.jsonl").exists():
        raise FedSimError(f"{run_dir} has no metrics.jsonl", "pass a directory written by `fedsim run`")
    for f in plot_run(run_dir):
        console.print(str(f))


@app.command()
def partition(
    scenario: Annotated[str, typer.Argument(help="scenario TOML file")],
    set_: Annotated[list[str] | None, typer.Option("--set", "-s")] = None,
    plot_: Annotated[bool, typer.Option("--plot", help="draw the label distribution per client")] = False,
    out: Annotated[Path, typer.Option(help="where to write the plot")] = Path("partition.png"),
    fmt: Format = "text",
) -> None:
    """Show how SCENARIO's data is split across clients (label counts per client)."""
    from fedsim.data.federation import federation_of, label_counts

    scen = _load(scenario, set_)
    d = scen.data
    fed = federation_of(scen)
    counts = label_counts(fed)
    if fmt == "json":
        print(json.dumps({"counts": counts.tolist(), "sizes": counts.sum(1).tolist()}))
    else:
        table = Table(title=f"{d.dataset} / {d.partitioner}")
        table.add_column("client")
        table.add_column("size", justify="right")
        table.add_column("label counts")
        for i, row in enumerate(counts):
            table.add_row(str(i), str(int(row.sum())), " ".join(str(int(c)) for c in row))
        console.print(table)
    if plot_:
        from fedsim.data.plot import plot_label_distribution

        plot_label_distribution(fed, out)
        err_console.print(f"wrote {out}")


@app.command()
def deploy(
    scenario: Annotated[str, typer.Argument(help="scenario TOML file")],
    nodes: Annotated[int, typer.Option(help="number of SuperNodes to start on loopback")] = 2,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s")] = None,
    out: Annotated[Path | None, typer.Option()] = None,
    overwrite: Overwrite = False,
    fmt: Format = "text",
) -> None:
    """Start a SuperLink and NODES SuperNodes on 127.0.0.1 (gRPC Fleet API) and run SCENARIO with `flwr run`."""
    _quiet_flower()
    from fedsim.engines.deploy import run_deploy

    scen = _load(scenario, set_, **{"run.engine": "deploy", "data.num_clients": nodes})
    out_dir = _out_dir(scen, out, overwrite)
    with _interruptible(scen, out_dir):
        summary = run_deploy(scen, out_dir, nodes=nodes)
    _report(summary, fmt)


def _register_privacy() -> None:
    from fedsim.privacy.cli import privacy_app

    app.add_typer(privacy_app, name="privacy")


_register_privacy()


def _register_experiments() -> None:
    from fedsim.experiments_cli import register

    register(app)  # fedsim sweep, fedsim compare


_register_experiments()


def main() -> None:
    """Entry point: map typed errors to exit codes with a one-line message and a hint."""
    try:
        code = app(standalone_mode=False)
    except RunInterrupted as err:
        from rich.markup import escape

        err_console.print(f"[red]interrupted[/red]: {escape(err.message)}", soft_wrap=True)
        _exit(err.exit_code)
    except FedSimError as err:
        from rich.markup import escape

        err_console.print(f"[red]error[/red] ({type(err).__name__}): {escape(err.message)}", soft_wrap=True)
        if err.hint:
            err_console.print(f"[yellow]hint[/yellow]: {escape(err.hint)}", soft_wrap=True)
        _exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        _exit(130)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        raise
    if isinstance(code, int) and code:  # Typer returns (not raises) the code of a command's Exit
        _exit(code)


def _exit(code: int) -> None:
    """Exit with ``code``. A thread an engine left running (Ray's ServerApp thread after an
    interrupt) must not hold the process: then exit at once, output flushed."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
