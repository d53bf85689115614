"""The Flower app's run config: which scenario ``flwr run`` runs, with which overrides, written where.

Keys of ``[tool.flwr.app.config]`` in ``pyproject.toml``, each overridable with
``flwr run . --run-config 'scenario="fedprox_pathological" overrides="run.rounds=2"'``:

``scenario``
    A built-in scenario's name (``"default"`` or ``"default.toml"``, see ``fedsim list``), the path
    of a scenario file — absolute, or relative to the Flower app's directory, i.e. the project
    ``flwr run`` packaged (``"scenarios/default.toml"``) — or a whole scenario as TOML text (what
    ``fedsim deploy`` writes into the app it generates; recognised by its line breaks).
``overrides``
    ``section.key=value`` items, exactly as ``fedsim run --set`` takes them, separated by ``;`` or
    by spaces: ``"run.rounds=2; client.lr=0.1"`` or ``"run.rounds=2 client.lr=0.1"``. A value that
    holds a space (``client.plugins=["fedprox", "x"]``) is kept whole: an item starts only where a
    ``section.key=`` follows the space.
``out-dir``
    The run directory the ServerApp writes (a path on the SuperLink's machine); empty: a new
    directory under ``run.output`` (:func:`fedsim.results.create_run_dir`).
``node-partitions``
    Optional, deployments only: ``NODE_ID:PARTITION_ID/NUM_PARTITIONS`` per SuperNode, comma-separated,
    as each node's ``--node-config`` says; the ServerApp then maps nodes without ``query.whoami`` and
    refuses a node not listed (:mod:`fedsim.strategies.node_directory`). ``fedsim deploy`` writes it
    when node authentication is on (the node ids are known before the run).

The ServerApp and every ClientApp read these same keys with :func:`scenario_from_run_config`, so
all of them build the same scenario; a key they cannot use is a :class:`~fedsim.errors.ConfigError`
naming ``run-config.<key>``, raised before round 1.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsim.config import Scenario, dumps_scenario, read_scenario_text, scenario_from_dict
from fedsim.errors import ConfigError

#: the run-config keys the Flower app reads
RUN_CONFIG_KEYS = ("scenario", "overrides", "out-dir", "node-partitions")
_ITEM_START = re.compile(r"[;\s]+(?=[A-Za-z_][\w-]*(?:\.[\w-]+)+\s*=)")
_HOW = ("set it in [tool.flwr.app.config] of pyproject.toml or with flwr run . --run-config "
        "'scenario=\"default\"' (a built-in name, or a path relative to the app directory)")


def split_overrides(text: str) -> list[str]:
    """``"run.rounds=2; client.lr=0.1"`` → ``["run.rounds=2", "client.lr=0.1"]`` (``;`` or spaces before
    each ``section.key=``; a value's own spaces stay inside it)."""
    items = [part.strip().rstrip(";").strip() for part in _ITEM_START.split(text.strip().strip(";"))]
    return [item for item in items if item]


def app_directories() -> list[Path]:
    """Directories a relative scenario path is looked up in, first match wins: each Flower app
    directory on ``sys.path`` (Flower puts the app it installed from the run's FAB there before loading
    the ServerApp or ClientApp; it holds the project's ``*.toml`` files), then the working directory."""
    seen: list[Path] = []
    for entry in sys.path:
        if not entry:
            continue
        p = Path(entry)
        if (p / "pyproject.toml").is_file() and p not in seen:
            seen.append(p)
    cwd = Path(os.getcwd())
    return seen + ([cwd] if cwd not in seen else [])


def _builtin_dir() -> Path:
    import fedsim.scenarios

    return Path(fedsim.scenarios.__file__).resolve().parent


def builtin_names() -> list[str]:
    return sorted(p.stem for p in _builtin_dir().glob("*.toml"))


def locate_scenario(ref: str) -> Path:
    """The scenario file ``ref`` names (see the module docstring); :class:`ConfigError` if none."""
    p = Path(ref).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [base / p for base in app_directories()]
        parts = p.parts
        if len(parts) == 1 or (len(parts) == 2 and parts[0] == "scenarios"):  # a built-in one, by name
            name = parts[-1] if parts[-1].endswith(".toml") else f"{parts[-1]}.toml"
            candidates.append(_builtin_dir() / name)
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(c.parent) for c in candidates[:4])
    raise ConfigError("run-config.scenario", f"'{ref}' is not a built-in scenario ({', '.join(builtin_names())}) "
                      f"nor a scenario file (looked in: {looked})", _HOW)


@functools.lru_cache(maxsize=8)
def _resolved(ref: str, overrides: str, where: tuple[str, ...], stamp: tuple[float, ...]) -> str:
    """The scenario's TOML text, once per process and key: ``where`` (the directories looked in) and
    ``stamp`` (their candidate files' modification times) are only part of the key, so an edited file or
    another app directory is read again. A ClientApp calls this for every message it serves."""
    if "\n" in ref:  # a whole scenario as TOML text (fedsim deploy's generated app)
        source, text = "run-config.scenario", ref
    else:
        path = locate_scenario(ref)
        try:
            _, text = read_scenario_text(path)
        except ConfigError as err:
            raise ConfigError("run-config.scenario", err.message, err.hint) from None
        source = f"run-config.scenario ({path})"
    try:
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as err:
        why = err if isinstance(err, tomllib.TOMLDecodeError) else "nested too deeply to parse"
        raise ConfigError(source, f"not valid TOML: {why}", "fix the scenario file, or name a built-in "
                          "scenario (`fedsim list`)") from None
    try:
        scenario_from_dict(raw)  # the file alone first, so an error blames the file, not the overrides
    except ConfigError as err:
        raise ConfigError(source, err.message, err.hint) from None
    try:
        scenario = scenario_from_dict(raw, split_overrides(overrides))
    except ConfigError as err:
        raise ConfigError("run-config.overrides", err.message,
                          "give section.key=value items separated by ';' or spaces, e.g. --run-config "
                          "'overrides=\"run.rounds=2; client.lr=0.1\"'") from None
    return dumps_scenario(scenario)


def scenario_text(run_config: Mapping[str, Any]) -> str:
    """The scenario a Flower run config names, with its overrides applied, as TOML text (the same text in
    the ServerApp and in every ClientApp of the run). Typed :class:`ConfigError` for a missing or unusable key."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"run-config.{unknown[0]}", f"is not a fedsim run-config key (known: "
                          f"{', '.join(RUN_CONFIG_KEYS)})", "scenario keys go into overrides, e.g. "
                          "--run-config 'overrides=\"run.rounds=2\"'")
    ref = run_config.get("scenario", "")
    overrides = run_config.get("overrides", "")
    for key, value in (("scenario", ref), ("overrides", overrides)):
        if not isinstance(value, str):
            raise ConfigError(f"run-config.{key}", f"must be a string (got {value!r})",
                              f"quote it: --run-config '{key}=\"...\"'")
    if not ref.strip():
        raise ConfigError("run-config.scenario", "is empty: the Flower app needs a scenario", _HOW)
    ref = ref if "\n" in ref else ref.strip()
    where = tuple(str(d) for d in app_directories())
    stamp = tuple(_mtime(Path(d) / ref) for d in where) if "\n" not in ref else ()
    return _resolved(ref, overrides, where, stamp)


def scenario_from_run_config(run_config: Mapping[str, Any]) -> Scenario:
    """:func:`scenario_text` as a validated :class:`~fedsim.config.Scenario`."""
    return scenario_from_dict(tomllib.loads(scenario_text(run_config)))


def out_dir_from_run_config(run_config: Mapping[str, Any]) -> str:
    """``out-dir`` of the run config ("" when unset: a new run directory under ``run.output``)."""
    value = run_config.get("out-dir", "")
    if not isinstance(value, str):
        raise ConfigError("run-config.out-dir", f"must be a string path (got {value!r})",
                          "--run-config 'out-dir=\"runs/my-run\"'")
    return value.strip()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0
