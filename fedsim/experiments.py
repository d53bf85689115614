"""Experiments: a grid of settings × seeds run into one sweep directory, and runs compared across seeds.

``fedsim sweep SCENARIO --grid key=v1,v2 --seeds 0,1,2 --out DIR`` (:func:`plan_sweep`,
:func:`run_sweep`) runs every combination of the ``--grid`` values (a Cartesian product) once per seed,
each in its own run directory ``DIR/<key-value_…>-s<seed>``, and keeps ``DIR/sweep.json``, the index of
settings → run directories with each run's status. A value is read as a TOML value (``0.1``, ``true``,
``"x"``, a bare word is a string); an inline table sets several keys together, so settings that go in
pairs are one grid entry: ``--grid 'strategy={name="signsgd",b=0.03},{name="mediansgd",b=0.3}'``.
Every planned run is validated before the first one starts. A rerun of the same command skips the runs
whose ``summary.json`` says ``completed``, continues an interrupted one from its checkpoint (local
engine) and runs again one that stopped or failed; a run directory written by a different scenario
is refused, never mixed in. ``--jobs N`` runs N runs at a time, each in its own process.

``fedsim compare RUNS_OR_SWEEPS…`` (:func:`collect_runs`, :func:`compare`) groups run directories that
differ only by their seed (``config.toml`` compared key by key, apart from :data:`NOT_COMPARED`) and
gives each group's mean ± sample standard deviation (ddof = 1) of a metric at a round: ``last`` (the
last row holding the metric), ``N``, or ``max`` / ``min`` over every row holding it (round 0, the
initial model, included). Groups are named by the keys in which they differ. Runs that did not
complete are left out and listed. The curves (mean ± std band per group) are drawn by
:mod:`fedsim.experiments_plot`.

Reference: the seeds × methods protocol of the comparison scripts ``bench/compare_*.py``;
``tests/fedsim/test_experiments.py`` checks that a sweep reproduces ``bench/compare_signsgd.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import tomllib
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from fedsim.config import Scenario, dumps_scenario, load_scenario, parse_value, scenario_from_dict
from fedsim.errors import ConfigError, RunDirectoryError
from fedsim.results import atomic_write, holds_run, read_jsonl

SWEEP_INDEX = "sweep.json"
#: keys that never change a run's results, so runs differing in them are the same setting
NOT_COMPARED = ("run.seed", "run.name", "run.output", "run.progress", "run.checkpoint_every", "run.log")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ------------------------------------------------------------------------------------------------ grid
def split_values(text: str) -> list[str]:
    """``v1,v2,…`` split at the commas outside brackets, braces and quotes (``[1, 2],{a=1, b=2}``)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _flatten(key: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in _flatten(f"{key}.{k}", v)]
    return [(key, value)]


def parse_grid(specs: list[str]) -> list[list[tuple[tuple[str, Any], ...]]]:
    """``--grid key=v1,v2`` entries → per entry, its values, each a tuple of ``(dotted key, value)``
    (one pair, or several for an inline table). A key in two entries, ``run.seed`` (use ``--seeds``), an
    empty value or a duplicate value is a :class:`ConfigError` naming ``--grid``."""
    grid, seen = [], {}
    for spec in specs:
        key, eq, text = spec.partition("=")
        key = key.strip()
        if not eq or len([p for p in key.split(".") if p]) < 1 or not text.strip():
            raise ConfigError("--grid", f"'{spec}' is not key=value1,value2,…",
                              "e.g. --grid client.lr=0.01,0.1 or "
                              "--grid 'strategy={name=\"fedavg\"},{name=\"fedprox\"}'")
        raw = split_values(text)
        if "" in raw:
            raise ConfigError("--grid", f"'{spec}' has an empty value", "separate values by single commas")
        bad = [v for v in raw if v[0] in "[{" and isinstance(parse_value(v), str)]
        if bad:
            raise ConfigError("--grid", f"{bad[0]} is not a TOML array or inline table",
                              'quote the strings in it: {name="fedavg"}, ["a", "b"]')
        values = [tuple(_flatten(key, parse_value(v))) for v in raw]
        if len(set(map(repr, values))) < len(values):
            raise ConfigError("--grid", f"'{spec}' lists a value twice", "list each value once")
        for pairs in values:
            for k, _ in pairs:
                if len(k.split(".")) < 2:
                    raise ConfigError("--grid", f"'{k}' is a section, not a key", "give a table of its keys: "
                                      f"--grid '{k}={{key=value}},{{key=value}}'")
                if k == "run.seed":
                    raise ConfigError("--grid", "run.seed is the sweep's other axis", "use --seeds 0,1,2")
                if seen.setdefault(k, spec) != spec:
                    raise ConfigError("--grid", f"'{k}' is set by two entries ({seen[k]!r} and {spec!r})",
                                      "set each key in one --grid entry")
        grid.append(values)
    return grid


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` → ``[0, 1, 2]`` (non-negative integers, each once)."""
    try:
        seeds = [int(s) for s in split_values(text)]
    except ValueError:
        raise ConfigError("--seeds", f"'{text}' is not a comma-separated list of integers",
                          "e.g. --seeds 0,1,2") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError("--seeds", f"{seeds}: seeds are non-negative and listed once", "e.g. --seeds 0,1,2")
    return seeds


def _literal(value: Any) -> str:
    """``value`` as the TOML text ``--set`` parses back to it."""
    import tomli_w

    return tomli_w.dumps({"v": value}).partition("=")[2].strip() if not isinstance(value, list) else \
        "[" + ", ".join(_literal(v) for v in value) + "]"


def shown(value: Any) -> str:
    """``value`` as a label shows it: strings bare, everything else as its TOML literal."""
    return value if isinstance(value, str) else _literal(value)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its setting (dotted key → value, grid order), seed, directory and scenario."""

    setting: tuple[tuple[str, Any], ...]
    seed: int
    dir: Path
    scenario: Scenario = field(compare=False, repr=False)
    action: str = "new"  #: new | skip (completed) | resume (interrupted, checkpoint) | rerun (stopped, failed)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={shown(v)}" for k, v in self.setting) or "(scenario as given)"


def run_dir_name(setting: tuple[tuple[str, Any], ...], seed: int) -> str:
    """``key-value_key-value-s<seed>`` (path-safe; a digest of the setting when it would be too long)."""
    text = "_".join(f"{k}-{shown(v)}" for k, v in setting)
    name = _UNSAFE.sub("-", text).strip(".-") or "scenario"
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    return f"{name}-s{seed}"


def plan_sweep(scenario: str, grid: list[list[tuple[tuple[str, Any], ...]]], seeds: list[int],
               sets: list[str], out: Path) -> list[PlannedRun]:
    """Every (setting, seed) of the grid, validated and resolved now, with what a rerun does with
    its directory (:func:`existing_action`)."""
    from fedsim.catalog import resolve

    plan, names = [], {}
    for combo in product(*grid) if grid else [()]:
        setting = tuple(pair for pairs in combo for pair in pairs)
        for seed in seeds:
            overrides = [*sets, *(f"{k}={_literal(v)}" for k, v in setting), f"run.seed={seed}"]
            scen = resolve(load_scenario(scenario, overrides))
            name = run_dir_name(setting, seed)
            if name in names:  # two settings that read alike once made path-safe
                name = f"{name[:-len(f'-s{seed}')]}-{hashlib.sha256(repr(setting).encode()).hexdigest()[:8]}-s{seed}"
            names[name] = setting
            run = PlannedRun(setting, seed, out / name, scen)
            plan.append(PlannedRun(setting, seed, run.dir, scen, existing_action(run)))
    return plan


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's scenario as dotted key → value without :data:`NOT_COMPARED` (and the noise multiplier a
    ``privacy.target_epsilon`` calibrated, which the run wrote beside the target)."""
    flat = dict(_flatten("", {k: v for k, v in config.items() if k != "meta"}))
    flat = {k.lstrip("."): v for k, v in flat.items()}
    if flat.get("privacy.target_epsilon"):
        flat.pop("privacy.noise_multiplier", None)
    return {k: v for k, v in flat.items() if k not in NOT_COMPARED}


def existing_action(run: PlannedRun) -> str:
    """What a sweep does with ``run.dir``: ``new`` (absent or empty), ``skip`` (completed), ``resume``
    (interrupted or killed, with a checkpoint, local engine), ``rerun`` (stopped, failed, or no
    checkpoint). A directory that holds something else, or a run of a different scenario, is refused."""
    d = run.dir
    if not d.exists() or (d.is_dir() and not any(d.iterdir())):
        return "new"
    if not (d / "config.toml").is_file():
        raise RunDirectoryError(f"{d} exists and is not a fedsim run directory (no config.toml)",
                                "move it away or pass another --out")
    there = comparable(tomllib.loads((d / "config.toml").read_text()))
    planned = comparable(tomllib.loads(dumps_scenario(run.scenario)))
    if there != planned:
        key = sorted(k for k in set(there) | set(planned) if there.get(k) != planned.get(k))[0]
        raise RunDirectoryError(f"{d} holds a run of another scenario ({key}: {there.get(key)!r} there, "
                                f"{planned.get(key)!r} planned); a sweep never mixes runs",
                                "pass a new --out, or delete that run directory to run it again")
    status = read_summary(d).get("status")
    if status == "completed":
        return "skip"
    resumable = run.scenario.run.engine == "local" and (d / "checkpoints" / "latest.json").is_file()
    return "resume" if status in (None, "interrupted") and resumable else "rerun"


def read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------ running
def execute(scen: Scenario, out_dir: Path, action: str) -> dict[str, Any]:
    """Run one planned run on its engine (``resume`` continues it; ``rerun`` empties it first) and
    return its summary; a run that does not complete raises its typed error, as ``fedsim run`` does."""
    from fedsim.results import prepare_out_dir

    if action == "resume":
        from fedsim.results import resume_point

        resume_point(out_dir, scen)
    else:
        prepare_out_dir(out_dir, overwrite=action == "rerun")
    engine = scen.run.engine
    if engine == "local":
        from fedsim.engines.local import run_local

        return run_local(scen, out_dir, resume=action == "resume")
    if engine == "ray":
        from fedsim.engines.ray import run_ray

        return run_ray(scen, out_dir)
    from fedsim.engines.deploy import run_deploy

    return run_deploy(scen, out_dir, nodes=scen.deploy.nodes)


def execute_text(toml_text: str, out_dir: str, action: str) -> dict[str, Any]:
    """:func:`execute` in a worker process: the scenario travels as its TOML text. Returns the
    summary, or ``{"status", "error"}`` when the run raised (the parent reports it)."""
    import logging

    from flwr.common.logger import FLOWER_LOGGER  # importing it sets DEBUG: lowered after the import

    from fedsim.catalog import resolve

    FLOWER_LOGGER.setLevel(logging.WARNING)
    scen = resolve(scenario_from_dict(tomllib.loads(toml_text)))
    try:
        return execute(scen, Path(out_dir), action)
    except Exception as err:  # noqa: BLE001 - reported per run; the sweep goes on
        return {"status": read_summary(Path(out_dir)).get("status") or f"failed: {type(err).__name__}",
                "error": str(err)}


def write_index(out: Path, scenario: str, sets: list[str], grid_specs: list[str], seeds: list[int],
                plan: list[PlannedRun]) -> None:
    """``sweep.json``: the sweep's definition and, per run, setting, seed, directory and status. Runs
    already indexed by an earlier sweep into ``out`` whose directories still exist are kept."""
    path = out / SWEEP_INDEX
    old = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
    mine = {r.dir.name for r in plan}
    runs = [r for r in old if r.get("dir") not in mine and (out / str(r.get("dir"))).is_dir()]
    for r in plan:
        summary = read_summary(r.dir)
        runs.append({"setting": dict(r.setting), "label": r.label, "seed": r.seed, "dir": r.dir.name,
                     "status": summary.get("status", "pending")})
    index = {"scenario": scenario, "set": sets, "grid": grid_specs, "seeds": seeds,
             "grid_keys": list(dict.fromkeys(k for r in plan for k, _ in r.setting)), "runs": runs}
    atomic_write(path, json.dumps(index, indent=2, default=str))


# ------------------------------------------------------------------------------------------------ compare
@dataclass
class RunRecord:
    """One run directory as :func:`compare` reads it."""

    dir: Path
    config: dict[str, Any]
    seed: int
    status: str | None
    rows: list[dict[str, Any]]


def collect_runs(paths: list[Path]) -> tuple[list[RunRecord], list[str]]:
    """The run directories behind ``paths`` (a sweep directory: the runs ``sweep.json`` lists; a run
    directory; a directory of run directories) and the preferred order of keys (the sweeps' grids)."""
    dirs, order = [], []
    for p in paths:
        if (p / SWEEP_INDEX).is_file():
            index = json.loads((p / SWEEP_INDEX).read_text())
            order += index.get("grid_keys", [])
            dirs += [p / r["dir"] for r in index.get("runs", []) if (p / r["dir"] / "config.toml").is_file()]
        elif (p / "config.toml").is_file():
            dirs.append(p)
        elif p.is_dir() and (inner := sorted(c for c in p.iterdir() if (c / "config.toml").is_file())):
            dirs += inner
        else:
            raise RunDirectoryError(f"{p} is neither a run directory (config.toml), a sweep (sweep.json) nor a "
                                    "directory of run directories", "pass what `fedsim run` or `fedsim sweep` wrote")
    records, seen = [], set()
    for d in dirs:
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        config = _with_defaults(tomllib.loads((d / "config.toml").read_text()))
        records.append(RunRecord(d, config, int(config.get("run", {}).get("seed", 0)),
                                 read_summary(d).get("status"), read_jsonl(d / "metrics.jsonl")))
    return records, list(dict.fromkeys(order))


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A run's ``config.toml`` with every key fedsim's schema defaults filled in, so runs written before a
    key existed compare equal to runs that state its default (the file as it is, if it no longer validates)."""
    try:
        return {**scenario_from_dict(config).to_dict(), "meta": config.get("meta", {})}
    except Exception:  # noqa: BLE001 - a config of another fedsim version: compared as written
        return config


def metric_value(rows: list[dict[str, Any]], metric: str, at: str) -> float | None:
    """``metric`` of a run at ``at``: ``last`` (last row holding it), ``max``/``min`` (over every row
    holding it) or a round number; None when no such row holds it."""
    have = [r for r in rows if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)]
    if not have:
        return None
    if at == "last":
        return float(have[-1][metric])
    if at in ("max", "min"):
        return float((max if at == "max" else min)(r[metric] for r in have))
    hit = [r for r in have if int(r.get("round", -1)) == int(at)]
    return float(hit[0][metric]) if hit else None


def check_round(at: str) -> str:
    if at in ("last", "max", "min") or (at.isdigit()):
        return at
    raise ConfigError("--round", f"'{at}' is not last, max, min or a round number", "e.g. --round last or --round 20")


@dataclass
class Group:
    """Runs of one setting: label, setting (the keys in which the groups differ), runs, values."""

    label: str
    setting: dict[str, Any]
    runs: list[RunRecord]
    values: dict[str, list[float]] = field(default_factory=dict)

    def stats(self, metric: str) -> tuple[float, float | None]:
        v = self.values[metric]
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def compare(records: list[RunRecord], metrics: list[str], at: str,
            order: list[str] | None = None) -> tuple[list[Group], list[str]]:
    """Group completed runs that differ only by seed; each group's values of ``metrics`` at ``at``.
    Returns the groups (in the order their first run was given) and notes on the runs left out.
    A metric no run has, or a group where some runs lack it, is a :class:`ConfigError`."""
    notes = [f"left out {r.dir}: status {r.status or 'none (running or killed)'}"
             for r in records if r.status != "completed"]
    done = [r for r in records if r.status == "completed"]
    if not done:
        raise ConfigError("RUNS", "no completed run among the directories given", "finish the runs first "
                          "(fedsim sweep resumes them)")
    keys = {id(r): comparable(r.config) for r in done}
    buckets: dict[str, list[RunRecord]] = {}
    for r in done:
        buckets.setdefault(json.dumps(keys[id(r)], sort_keys=True, default=str), []).append(r)
    varying = [k for k in dict.fromkeys(k for r in done for k in keys[id(r)])
               if len({json.dumps(keys[id(r)].get(k), default=str) for r in done}) > 1]
    first = {k: i for i, k in enumerate(order or [])}
    varying.sort(key=lambda k: (first.get(k, len(first)), k))
    groups = []
    for runs in buckets.values():
        seeds: dict[int, RunRecord] = {}
        for r in runs:
            if r.seed in seeds:
                notes.append(f"left out {r.dir}: the same setting and seed {r.seed} as {seeds[r.seed].dir}")
            else:
                seeds[r.seed] = r
        runs = sorted(seeds.values(), key=lambda r: r.seed)
        setting = {k: keys[id(runs[0])].get(k) for k in varying}
        label = " ".join(f"{k}={shown(v) if v is not None else '(unset)'}" for k, v in setting.items())
        groups.append(Group(label or str(runs[0].config.get("run", {}).get("name", "runs")), setting, runs))
    for metric in metrics:
        if all(metric_value(r.rows, metric, "last") is None for r in done):
            present = sorted({k for r in done for row in r.rows for k in row if k != "round"})
            raise ConfigError("--metric", f"no run has '{metric}'; the runs have: {', '.join(present)}",
                              "pick one of those")
        for g in groups:
            values = [metric_value(r.rows, metric, at) for r in g.runs]
            missing = [str(r.dir) for r, v in zip(g.runs, values) if v is None or not math.isfinite(v)]
            if missing:
                raise ConfigError("--round", f"'{metric}' at round {at} is missing or not finite in {missing[:3]}",
                                  "pick a round where it was evaluated (run.eval_every) or --round last")
            g.values[metric] = values
    return groups, notes


def table(groups: list[Group], metrics: list[str], at: str) -> str:
    """A markdown table: setting, seeds, ``mean ± std`` per metric (4 decimals)."""
    head = ["setting", "seeds", *(f"{m} ({at})" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = []
        for m in metrics:
            mean, sd = g.stats(m)
            cells.append(f"{mean:.4f} ± {sd:.4f}" if sd is not None else f"{mean:.4f} (one run)")
        lines.append("| " + " | ".join([g.label, ",".join(str(r.seed) for r in g.runs), *cells]) + " |")
    return "\n".join(lines)


def as_json(groups: list[Group], metrics: list[str], at: str, notes: list[str]) -> dict[str, Any]:
    out = []
    for g in groups:
        entry = {"label": g.label, "setting": g.setting, "seeds": [r.seed for r in g.runs],
                 "runs": [str(r.dir) for r in g.runs], "metrics": {}}
        for m in metrics:
            mean, sd = g.stats(m)
            entry["metrics"][m] = {"values": g.values[m], "mean": mean, "std": sd}
        out.append(entry)
    return {"round": at, "metrics": metrics, "groups": out, "left_out": notes}
