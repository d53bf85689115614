"""``fedsim privacy …``: accountants, counters and calibration from the command line."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from fedsim.cli_options import Format

privacy_app = typer.Typer(no_args_is_help=True, help="Privacy accounting, counters and noise calibration.")
console = Console()


def _emit(result: dict, fmt: str, text: str) -> None:
    if fmt == "json":
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        console.print(text)


@privacy_app.command()
def epsilon(
    noise: Annotated[float, typer.Option(help="noise multiplier z = σ / C")],
    sample_rate: Annotated[float, typer.Option(help="sampling probability q per step")],
    steps: Annotated[int, typer.Option(help="number of steps (compositions)")],
    delta: Annotated[float, typer.Option(help="δ")] = 1e-5,
    accountant: Annotated[str, typer.Option(help="rdp | pld")] = "rdp",
    sampling: Annotated[str, typer.Option(help="poisson | without-replacement")] = "poisson",
    population: Annotated[int | None, typer.Option(help="n for sampling without replacement")] = None,
    fmt: Format = "text",
) -> None:
    """ε(δ) of the (Poisson-)subsampled Gaussian mechanism after STEPS steps."""
    from fedsim.privacy.commands import epsilon as eps

    kind = "fixed" if sampling in ("without-replacement", "fixed") else sampling
    r = eps(noise, sample_rate, steps, delta, accountant, kind, population)
    shown = f"{r['epsilon']:.6g}" if r["finite"] else "∞ (no noise)"
    _emit(r, fmt, f"ε = {shown} at δ = {delta:g} ({accountant}, {sampling})")


@privacy_app.command()
def counter(
    mechanism: Annotated[str, typer.Option(help="tree | honaker | sqrt")],
    t: Annotated[int, typer.Option("--T", help="stream length T")],
    rho: Annotated[float, typer.Option(help="ρ of ρ-zCDP for the whole stream")],
    trials: Annotated[int, typer.Option(help="Monte Carlo trials")] = 2000,
    seed: Annotated[int, typer.Option(help="seed of the trials")] = 0,
    fmt: Format = "text",
) -> None:
    """Per-step noise variance of a continual-release counter: measured vs theory."""
    from fedsim.privacy.commands import counter_variance

    r = counter_variance(mechanism, t, rho, trials, seed)
    worst = max(range(len(r["t"])), key=lambda i: r["theoretical_variance"][i])
    _emit(r, fmt, f"{mechanism}: T={t}, ρ={rho}: max theoretical variance {r['theoretical_variance'][worst]:.4g} "
                  f"at t={r['t'][worst]} (measured {r['measured_variance'][worst]:.4g})")


@privacy_app.command()
def calibrate(
    epsilon: Annotated[float, typer.Option(help="target ε")],
    delta: Annotated[float, typer.Option(help="δ")] = 1e-5,
    sample_rate: Annotated[float, typer.Option(help="sampling probability q per step")] = 1.0,
    steps: Annotated[int, typer.Option(help="number of steps")] = 1,
    accountant: Annotated[str, typer.Option(help="rdp | pld")] = "rdp",
    sampling: Annotated[str, typer.Option(help="poisson | without-replacement")] = "poisson",
    fmt: Format = "text",
) -> None:
    """The smallest noise multiplier whose ε(δ) does not exceed the target (never overshoots)."""
    from fedsim.privacy.commands import calibrate as cal

    kind = "fixed" if sampling in ("without-replacement", "fixed") else sampling
    r = cal(epsilon, delta, sample_rate, steps, accountant, kind)
    _emit(r, fmt, f"σ = {r['noise_multiplier']:.6g} gives ε = {r['epsilon']:.6g} ≤ {epsilon:g}")


@privacy_app.command()
def utility(
    run_dirs: Annotated[list[str], typer.Argument(help="run directories of private runs")],
    out: Annotated[str, typer.Option(help="PNG to write")] = "privacy_utility.png",
) -> None:
    """Privacy–utility plot across runs: final accuracy against total ε."""
    from fedsim.plots import plot_privacy_utility

    console.print(str(plot_privacy_utility(run_dirs, out)))


@privacy_app.command()
def audit(
    scenario: Annotated[str, typer.Argument(help="scenario TOML file (or the name of a built-in one)")],
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="override: section.key=value")] = None,
    trials: Annotated[int, typer.Option(help="runs of the mechanism in all, half of them with the canary")] = 4000,
    confidence: Annotated[float, typer.Option(help="confidence of the lower bound (Clopper–Pearson)")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="root seed (run.seed)")] = None,
    fmt: Format = "text",
) -> None:
    """Empirical lower bound on ε from canaries run through the scenario's real DP code, beside the claimed ε.

    Exits with code 13 (AuditViolation) when the bound exceeds the claim (the claim is then refuted at that confidence).
    """
    from fedsim.catalog import resolve
    from fedsim.config import load_scenario
    from fedsim.privacy.audit_run import audit_scenario

    overrides = list(set_ or []) + ([f"run.seed={seed}"] if seed is not None else [])
    report = audit_scenario(resolve(load_scenario(scenario, overrides)), trials=trials, confidence=confidence)
    r, rel = report.to_dict(), report.release
    verdict = "[red]VIOLATED: the claim is refuted[/red]" if r["violated"] else "consistent with the claim"
    _emit(r, fmt, f"{report.mechanism} ({rel['count']} {rel['kind']}, z = {rel['noise_multiplier']:g}, "
                  f"q = {rel['sample_rate']:.4g}, {rel['accountant']}): claimed ε = {r['claimed_epsilon']:.4g}, "
                  f"audited ε ≥ {r['epsilon_lower_bound']:.4g} at {confidence:.0%} confidence over {r['trials']} "
                  f"trials (δ = {r['delta']:g}): {verdict}")
    if r["violated"]:
        from fedsim.errors import AuditViolation

        raise typer.Exit(code=AuditViolation.exit_code)
