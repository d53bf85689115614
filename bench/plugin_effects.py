"""Per plugin: its effect on a built-in scenario that suits it, and its cost, against the plain run.

Each registered plugin names the scenario that suits it (``bench_scenario``), the ``--set`` items that
enable it there (``bench_overrides``) and the metric its effect is judged by (``bench_metric``). This
script runs that scenario with the plugin and without it (the same overrides minus the plugin's own
``client.plugins`` / ``client.<name>.*`` items) over the same seeds, and writes a markdown table:
metric mean ± std over the seeds for both, the difference, and the wall time per round (rounds ≥ 2,
so the one-off start-up of round 1 is left out) with the overhead ratio. Nothing is tuned here: a
technique that does not help in our setting shows it in the table.

    python bench/plugin_effects.py                       # every plugin with bench settings, 3 seeds
    python bench/plugin_effects.py --plugins ghost_bn distill --seeds 0 1 2 --rounds 5
    python bench/plugin_effects.py --out bench/plugin_effects.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _plain_overrides(name: str, overrides: tuple[str, ...]) -> list[str]:
    """The plugin's overrides without the items that enable or configure it."""
    own = ("client.plugins", f"client.{name}.", f"client.{name}=")
    return [o for o in overrides if not o.replace(" ", "").startswith(own)]


def _run(scenario: str, overrides: list[str], seed: int, rounds: int | None, metric: str) -> tuple[float, float]:
    from fedsim.catalog import resolve
    from fedsim.config import load_scenario
    from fedsim.engines.local import run_local
    from fedsim.results import read_jsonl

    extra = [f"run.seed={seed}", "run.progress=false", "run.checkpoint_every=0"]
    if rounds:
        extra.append(f"run.rounds={rounds}")
    path = ROOT / "scenarios" / f"{scenario}.toml"
    s = resolve(load_scenario(str(path), [*overrides, *extra]))
    with tempfile.TemporaryDirectory() as d:
        summary = run_local(s, Path(d) / "run")
        if summary["status"] != "completed":
            raise RuntimeError(f"{scenario} {overrides} seed {seed}: {summary['status']} ({summary.get('error')})")
        rows = [r for r in read_jsonl(Path(d) / "run" / "metrics.jsonl") if r.get("round", 0) >= 1]
    value = float(rows[-1].get(metric, float("nan")))
    later = [r["wall_s"] for r in rows if r["round"] >= 2 and "wall_s" in r] or [rows[-1].get("wall_s", float("nan"))]
    return value, statistics.median(later)


def _stat(values: list[float]) -> str:
    if any(v != v for v in values):
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def measure(name: str, seeds: list[int], rounds: int | None) -> dict:
    from fedsim.catalog import registries

    cls = registries()["plugins"].get(name)
    overrides = tuple(cls.bench_overrides)
    metric = cls.bench_metric
    on = [_run(cls.bench_scenario, list(overrides), s, rounds, metric) for s in seeds]
    off = [_run(cls.bench_scenario, _plain_overrides(name, overrides), s, rounds, metric) for s in seeds]
    m_on, m_off = [v for v, _ in on], [v for v, _ in off]
    t_on, t_off = statistics.median(t for _, t in on), statistics.median(t for _, t in off)
    diff = [a - b for a, b in zip(m_on, m_off)]
    return {"plugin": name, "scenario": cls.bench_scenario, "metric": metric, "overrides": " ".join(overrides),
            "with": _stat(m_on), "plain": _stat(m_off), "diff": _stat(diff),
            "s_round_with": t_on, "s_round_plain": t_off, "overhead": t_on / t_off if t_off else float("nan")}


def table(rows: list[dict], seeds: list[int]) -> str:
    head = ("plugin", "scenario", "metric", f"with plugin (mean ± std, {len(seeds)} seeds)", "plain", "difference",
            "s/round with", "s/round plain", "overhead ×")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append(f"| `{r['plugin']}` | {r['scenario']} | {r['metric']} | {r['with']} | {r['plain']} | {r['diff']} | "
                   f"{r['s_round_with']:.3f} | {r['s_round_plain']:.3f} | {r['overhead']:.2f} |")
    out.append("")
    out.append("Settings per plugin (`--set` items; the plain run drops the plugin's own items):")
    out.append("")
    out += [f"- `{r['plugin']}`: `{r['overrides']}`" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from fedsim.catalog import registries

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plugins", nargs="*", help="plugin names (default: every plugin with bench_overrides)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=None, help="cap run.rounds (default: the scenario's)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    reg = registries()["plugins"]
    names = args.plugins or [n for n in reg.names() if reg.get(n).bench_overrides]
    rows = []
    for name in names:
        t0 = time.perf_counter()
        rows.append(measure(name, args.seeds, args.rounds))
        print(f"{name}: {rows[-1]['with']} vs {rows[-1]['plain']} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    text = table(rows, args.seeds)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
