"""fedsim's Python API: run a scenario from Python, read its results, register extensions.

``fedsim.run(scenario, **overrides)`` runs exactly what ``fedsim run`` runs (the same resolver, engines and
run directory) and returns a :class:`Run`; a run that fails raises the typed
:class:`~fedsim.errors.FedSimError` the CLI maps to its exit code. The decorators register a strategy,
client plugin, model, dataset or partitioner defined in the user's own module in fedsim's registries
(``fedsim.registry``); ``module:object`` names in a scenario reach such objects without registering them.

Nothing heavy is imported here at module level: ``import fedsim`` stays light (``fedsim/__init__.py``
exports these names lazily).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError, FedSimError, RunDirectoryError

Source = Any  # a Scenario, a path or built-in name (str / os.PathLike), or a dict of TOML tables


class MissingDependencyError(FedSimError, ImportError):
    """An optional package a feature needs is not installed (e.g. pandas for :meth:`Run.to_pandas`)."""


# ---------------------------------------------------------------------------------------- scenarios
def override_items(overrides: Mapping[str, Any] | Sequence[str] | None = None,
                   **keyword_overrides: Any) -> list[str]:
    """``--set`` items (``section.key=TOML value``) from a dict ``{"run.rounds": 2}``, a list of
    ``"section.key=value"`` strings, and keywords ``run__rounds=2`` (``__`` stands for the dot), in that
    order (a later one wins). A dict value sets each of its keys (``{"data.partition": {"alpha": 0.1}}``)."""
    import tomli_w

    items: list[str] = []
    pairs: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        pairs += list(overrides.items())
    elif overrides is not None:
        if isinstance(overrides, str):
            raise ConfigError("overrides", "is a single string", 'pass a dict {"run.rounds": 2} or a list of '
                              '"section.key=value" strings')
        items += [str(item) for item in overrides]
    for name, value in keyword_overrides.items():
        if "__" not in name:
            raise ConfigError(name, "keyword overrides are written section__key=value (e.g. run__rounds=2)",
                              'or pass overrides={"section.key": value}')
        pairs.append((name.replace("__", "."), value))
    for key, value in _flatten(pairs):
        if value is None:
            raise ConfigError(key, "None is not a scenario value", "leave the key out to keep its default")
        try:
            literal = _literal(value, tomli_w)
        except TypeError as err:
            raise ConfigError(key, f"{value!r} cannot be written as a TOML value ({err})",
                              "use numbers, strings, booleans and lists of them") from None
        items.append(f"{key}={literal}")
    return items


def _literal(value: Any, tomli_w: Any) -> str:
    """``value`` as a one-line TOML literal (what ``--set`` parses)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v, tomli_w) for v in value) + "]"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _flatten(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    out = []
    for key, value in pairs:
        if isinstance(value, Mapping):
            out += _flatten([(f"{key}.{k}", v) for k, v in value.items()])
        else:
            out.append((str(key), value))
    return out


def load_scenario(source: Source, overrides: Mapping[str, Any] | Sequence[str] | None = None,
                  **keyword_overrides: Any):
    """A validated, resolved :class:`~fedsim.config.Scenario` from a scenario object, a TOML path, a
    built-in scenario's name (``"default.toml"``) or a dict of tables, with overrides applied
    (see :func:`override_items`). Every name is checked now: a typo fails here, naming its key."""
    import tomllib

    from fedsim.catalog import resolve
    from fedsim.config import Scenario, dumps_scenario, load_scenario as load_file, scenario_from_dict

    items = override_items(overrides, **keyword_overrides)
    if isinstance(source, Scenario):
        scenario = scenario_from_dict(tomllib.loads(dumps_scenario(source)), items)
    elif isinstance(source, Mapping):
        scenario = scenario_from_dict(dict(source), items)
    elif isinstance(source, (str, os.PathLike)):
        scenario = load_file(source, items)
    else:
        raise ConfigError("scenario", f"got a {type(source).__name__}", "pass a Scenario, a path to a .toml "
                          "file, a built-in scenario's name or a dict of tables")
    return resolve(scenario)


# ---------------------------------------------------------------------------------------- running
def run(scenario: Source, *, out: str | os.PathLike | None = None, overwrite: bool = False,
        overrides: Mapping[str, Any] | Sequence[str] | None = None, progress: bool = False,
        client_app: Any = None, **keyword_overrides: Any) -> Run:
    """Run a scenario, as ``fedsim run`` does, and return its :class:`Run`.

    Parameters
    ----------
    scenario
        A :class:`~fedsim.config.Scenario`, a TOML path, a built-in scenario's name or a dict of tables.
    out
        The run directory; new or empty, or (``overwrite=True``) a run directory to replace. Default: a new
        directory under ``run.output``.
    overrides, **keyword_overrides
        ``{"run.rounds": 2}`` and/or ``run__rounds=2`` (see :func:`override_items`).
    progress
        Report progress on stderr as ``fedsim run`` does (a bar on a terminal, one line per round
        otherwise; ``fedsim.progress``); off by default from Python. A scenario with
        ``run.progress = false`` stays silent, as under ``fedsim run``.
    client_app
        The clients' Flower ClientApp: a ``"module:object"`` name (sets ``run.client_app``; every engine),
        or a ``flwr.clientapp.ClientApp`` object (local and Ray engines). Default: the scenario's
        ``run.client_app``, else fedsim's own.

    Raises
    ------
    FedSimError
        The typed error of a refused scenario or of a run that did not complete (the CLI's exit code is
        ``err.exit_code``); when the run directory holds a summary, ``err.run`` is its :class:`Run`.
    """
    from fedsim.cli import _drop_if_empty, _execute, _quiet_flower
    from fedsim.progress import RunProgress
    from fedsim.results import prepare_out_dir
    from fedsim.server import default_run_dir

    if overwrite and out is None:
        raise RunDirectoryError("overwrite=True replaces the run in `out`, but no out was given",
                                "pass out=PATH, or drop overwrite")
    app_object = None
    if isinstance(client_app, str):
        keyword_overrides["run__client_app"] = client_app
    elif client_app is not None:
        from flwr.clientapp import ClientApp

        if not isinstance(client_app, ClientApp):
            raise ConfigError("client_app", f"got a {type(client_app).__name__}", "pass a flwr.clientapp.ClientApp "
                              "or its \"module:object\" name")
        app_object = client_app
    scen = load_scenario(scenario, overrides, **keyword_overrides)
    _quiet_flower()
    out_dir = prepare_out_dir(out, overwrite) if out is not None else default_run_dir(scen)
    try:
        _execute(scen, out_dir, RunProgress.for_stderr(quiet=not progress), client_app=app_object)
    except BaseException as err:
        _drop_if_empty(out_dir)  # refused before anything was written: leave no empty directory
        if isinstance(err, FedSimError) and (out_dir / "summary.json").is_file():
            err.run = Run(out_dir)  # type: ignore[attr-defined]
        raise
    return Run(out_dir)


class Run:
    """A run directory, read: ``metrics`` (the rows of ``metrics.jsonl``, one per round), ``clients``,
    ``privacy``, ``summary`` (``summary.json``), ``status``, ``scenario`` and, with pandas,
    ``to_pandas()`` / ``frame``. Files are read when asked for, so a run still being written shows
    what it has written so far."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        if not (self.dir / "config.toml").is_file():
            raise RunDirectoryError(f"{self.dir} is not a run directory (no config.toml)",
                                    "pass a directory written by fedsim.run or `fedsim run`")

    def _jsonl(self, name: str) -> list[dict[str, Any]]:
        from fedsim.results import read_jsonl

        return read_jsonl(self.dir / name)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """One dict per round (round 0 is the initial model), exactly the lines of ``metrics.jsonl``."""
        return self._jsonl("metrics.jsonl")

    @property
    def clients(self) -> list[dict[str, Any]]:
        """One dict per client per round (``clients.jsonl``): status ok / error / timeout / invalid…"""
        return self._jsonl("clients.jsonl")

    @property
    def privacy(self) -> list[dict[str, Any]]:
        """ε(δ) per round per mechanism (``privacy.jsonl``; empty for a non-private run)."""
        return self._jsonl("privacy.jsonl")

    @property
    def summary(self) -> dict[str, Any]:
        """``summary.json`` (empty while the run has not ended)."""
        path = self.dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def status(self) -> str | None:
        """``completed``, ``stopped: <Error>``, ``interrupted``, ``failed: <Type>`` (None while running)."""
        return self.summary.get("status")

    @property
    def final(self) -> dict[str, Any]:
        """The last round's metrics."""
        rows = self.metrics
        return rows[-1] if rows else {}

    @property
    def scenario(self):
        """The resolved scenario the run used (its ``config.toml``)."""
        from fedsim.config import load_scenario as load_file

        return load_file(self.dir / "config.toml")

    def to_pandas(self, table: str = "metrics"):
        """``metrics`` (default), ``clients`` or ``privacy`` as a pandas ``DataFrame``."""
        if table not in ("metrics", "clients", "privacy"):
            raise ConfigError("table", f"unknown table '{table}'", "use metrics, clients or privacy")
        try:
            import pandas
        except ImportError:
            raise MissingDependencyError("Run.to_pandas needs pandas, which is not installed",
                                         "pip install pandas (or read run.metrics, a list of dicts)") from None
        return pandas.DataFrame(self._jsonl(f"{table}.jsonl"))

    @property
    def frame(self):
        """``to_pandas()``: the per-round metrics as a DataFrame."""
        return self.to_pandas()

    def __repr__(self) -> str:
        acc = self.final.get("test_accuracy")
        shown = f", test_accuracy={acc:.4f}" if isinstance(acc, float) else ""
        return f"Run('{self.dir}', status={self.status!r}, rounds={len(self.metrics) - 1}{shown})"


def load_run(run_dir: str | os.PathLike) -> Run:
    """The :class:`Run` of an existing run directory."""
    return Run(run_dir)


# ---------------------------------------------------------------------------------------- registering
def _named(kind: str, obj: Any, name: str | None, register: Callable[[str, Any], Any], registry: Any) -> Any:
    """Register ``obj`` under ``name`` (default: its ``name`` attribute or ``__name__``); the same
    definition run again (a notebook cell, a reloaded module) replaces the earlier one."""
    key = (name or getattr(obj, "name", "") or getattr(obj, "__name__", "")).lower()
    if not key or ":" in key:
        raise FedSimError(f"cannot register {obj!r} as a {kind}: no valid name", f"pass one: @fedsim.register_"
                          f"{kind}(\"my_{kind}\") (letters, digits, _ and .)")
    old = registry._items.get(key)
    if old is not None and old is not obj and _same_definition(old, obj):
        registry.discard(key)
    return register(key, obj)


def _same_definition(a: Any, b: Any) -> bool:
    a, b = (getattr(x, "flower_class", None) or getattr(x, "__wrapped__", x) for x in (a, b))
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == \
        (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def _decorator(kind: str, name_or_obj: Any, fn: Callable[[str | None, Any], Any]) -> Any:
    """``@deco`` and ``@deco("name")`` both work."""
    if isinstance(name_or_obj, str) or name_or_obj is None:
        return lambda obj: fn(name_or_obj, obj)
    return fn(None, name_or_obj)


def register_strategy(name: Any = None) -> Any:
    """Register a strategy class: a :class:`~fedsim.strategies.base.FedSimStrategy` subclass, or a Flower
    ``flwr.serverapp.strategy.Strategy`` subclass (run through ``fedsim.strategies.flwr_adapter``)."""
    def do(given: str | None, cls: Any) -> Any:
        from fedsim.catalog import adopt_strategy
        from fedsim.strategies.base import STRATEGIES, FedSimStrategy

        key = (given or getattr(cls, "name", "") or getattr(cls, "__name__", "")).lower()
        if isinstance(cls, type) and issubclass(cls, FedSimStrategy):
            cls.name = key
        try:
            item = adopt_strategy(key, cls)
        except TypeError as err:
            raise FedSimError(f"cannot register {cls!r} as a strategy: {err}") from None
        _named("strategy", item, key, lambda k, o: STRATEGIES.register(k)(o), STRATEGIES)
        return cls

    return _decorator("strategy", name, do)


def register_plugin(name: Any = None) -> Any:
    """Register a client plugin class (a :class:`~fedsim.clients.plugin_api.ClientPlugin` subclass)."""
    def do(given: str | None, cls: Any) -> Any:
        from fedsim.clients.plugin_api import PLUGINS, ClientPlugin

        if not (isinstance(cls, type) and issubclass(cls, ClientPlugin)):
            raise FedSimError(f"cannot register {cls!r} as a plugin: not a ClientPlugin subclass")
        if given:
            cls.name = given.lower()
        return _named("plugin", cls, cls.name, lambda k, o: PLUGINS.register(k)(o), PLUGINS)

    return _decorator("plugin", name, do)


def register_model(name: Any = None) -> Any:
    """Register a model factory ``factory(cfg: ModelConfig, input_shape, num_classes) -> nn.Module``."""
    def do(given: str | None, fn: Any) -> Any:
        from fedsim.models import MODELS

        return _named("model", fn, given, lambda k, o: MODELS.register(k)(o), MODELS)

    return _decorator("model", name, do)


def register_dataset(name: Any = None) -> Any:
    """Register a dataset loader ``loader(seed, test_fraction, **options) -> fedsim.data.datasets.Dataset``
    (its options become ``[data.options]`` keys, checked)."""
    def do(given: str | None, fn: Any) -> Any:
        from fedsim.data.datasets import DATASETS, register_dataset as register

        return _named("dataset", fn, given, lambda k, o: register(k)(o), DATASETS)

    return _decorator("dataset", name, do)


def register_partitioner(name: Any = None) -> Any:
    """Register a partitioner ``fn(labels, num_partitions, rng, **params) -> list[np.ndarray]`` (its
    parameters become ``[data.partition]`` keys, checked)."""
    def do(given: str | None, fn: Any) -> Any:
        from fedsim.data.partitioners import PARTITIONERS, register_partitioner as register

        return _named("partitioner", fn, given, lambda k, o: register(k)(o), PARTITIONERS)

    return _decorator("partitioner", name, do)
