"""``fedsim`` command line: run, list, plot, partition, deploy, privacy.

User errors (:class:`~fedsim.errors.FedSimError`) print one line and a hint on stderr and exit with
the error's code; no traceback. ``--format json`` prints machine-readable output on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedsim.errors import FedSimError

app = typer.Typer(no_args_is_help=True, add_completion=False, context_settings={"help_option_names": ["-h", "--help"]},
                  help="fedsim: federated and privacy-preserving learning simulator (Flower + PyTorch).")
err_console = Console(stderr=True)
console = Console()

Format = Annotated[str, typer.Option("--format", help="text or json")]


def _quiet_flower() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _load(scenario: str, sets: list[str] | None, **direct: Any):
    """Load, validate and resolve a scenario (every name checked before anything runs)."""
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
    fmt: Format = "text",
) -> None:
    """Simulate a federation described by SCENARIO."""
    _quiet_flower()
    scen = _load(scenario, set_, **{"run.engine": engine, "run.seed": seed})
    from fedsim.server import default_run_dir

    out_dir = out or default_run_dir(scen)
    show = fmt == "text" and scen.run.progress and sys.stderr.isatty()
    summary = _execute(scen, out_dir, show)
    if fmt == "json":
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary)


def _execute(scen, out_dir: Path, show_progress: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    engine = scen.run.engine
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=err_console, disable=not show_progress, transient=False)
    with progress:
        task = progress.add_task(f"{scen.run.name} [{engine}]", total=scen.run.rounds, acc="")

        def on_round(rnd: int, row: dict[str, Any]) -> None:
            acc = row.get("test_accuracy")
            progress.update(task, completed=rnd, acc=f"acc {acc:.3f}" if isinstance(acc, float) else "")

        if engine == "local":
            from fedsim.engines.local import run_local

            return run_local(scen, out_dir, on_round)
        if engine == "ray":
            from fedsim.engines.ray import run_ray

            return run_ray(scen, out_dir, on_round)
        from fedsim.engines.deploy import run_deploy

        return run_deploy(scen, out_dir, nodes=scen.deploy.nodes)


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"fedsim run — {summary.get('status')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("rounds_completed", "strategy", "seed", "wall_time_s"):
        table.add_row(key, str(summary.get(key)))
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
    fmt: Format = "text",
) -> None:
    """Start a SuperLink and NODES SuperNodes on 127.0.0.1 (gRPC Fleet API) and run SCENARIO with `flwr run`."""
    _quiet_flower()
    from fedsim.engines.deploy import run_deploy
    from fedsim.server import default_run_dir

    scen = _load(scenario, set_, **{"run.engine": "deploy", "data.num_clients": nodes})
    summary = run_deploy(scen, out or default_run_dir(scen), nodes=nodes)
    if fmt == "json":
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary)


def _register_privacy() -> None:
    from fedsim.privacy.cli import privacy_app

    app.add_typer(privacy_app, name="privacy")


_register_privacy()


def main() -> None:
    """Entry point: map typed errors to exit codes with a one-line message and a hint."""
    try:
        app(standalone_mode=False)
    except FedSimError as err:
        from rich.markup import escape

        err_console.print(f"[red]error[/red] ({type(err).__name__}): {escape(err.message)}")
        if err.hint:
            err_console.print(f"[yellow]hint[/yellow]: {escape(err.hint)}")
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
