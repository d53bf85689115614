"""The resolver step: fills every registry and checks a scenario's names against them.

The schema (``fedsim.config``) only validates values; the entry points (the CLI, the engines, the
Flower app objects) call :func:`resolve` once before anything runs, so a typo in a strategy,
plugin, dataset, partitioner or model name — or an invalid strategy/plugin option — fails with a
typed error naming the key. :func:`load_all` is the one place that imports every built-in strategy,
plugin, client task, dataset, partitioner and model module (their import registers them).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from fedsim.config import Scenario
from fedsim.errors import ConfigError
from fedsim.faults import check_attack

_LOADED = False


def load_all() -> None:
    """Import the modules whose import registers things (idempotent)."""
    global _LOADED
    if _LOADED:
        return
    import fedsim.clients.plugins  # noqa: F401  (every plugin)
    import fedsim.clients.tasks  # noqa: F401  (the "fit" task)
    import fedsim.data.federation  # noqa: F401  (every dataset and partitioner)
    import fedsim.models  # noqa: F401
    import fedsim.strategies as strategies_pkg

    for mod in pkgutil.iter_modules(strategies_pkg.__path__):
        importlib.import_module(f"fedsim.strategies.{mod.name}")
    _LOADED = True


def registries() -> dict[str, Any]:
    """Every registry, complete: strategies, plugins, partitioners, datasets, models."""
    load_all()
    from fedsim.clients.plugin_api import PLUGINS
    from fedsim.data.datasets import DATASETS
    from fedsim.data.partitioners import PARTITIONERS
    from fedsim.models import MODELS
    from fedsim.strategies.base import STRATEGIES

    return {"strategies": STRATEGIES, "plugins": PLUGINS, "partitioners": PARTITIONERS,
            "datasets": DATASETS, "models": MODELS}


def builtin_scenarios() -> list[Path]:
    return sorted((Path(__file__).resolve().parent.parent / "scenarios").glob("*.toml"))


def resolve(scenario: Scenario) -> Scenario:
    """Resolve every name in the scenario and validate strategy/plugin options now; returns it."""
    from fedsim.clients.plugin_api import build_plugins
    from fedsim.options import build_options

    reg = registries()
    strat = reg["strategies"].get(scenario.strategy.name, key="strategy.name")
    build_options(strat.Options, scenario.strategy.options(), "strategy")
    reg["datasets"].get(scenario.data.dataset, key="data.dataset")
    reg["partitioners"].get(scenario.data.partitioner, key="data.partitioner")
    reg["models"].get(scenario.model.name, key="model.name")
    check_privacy(scenario, strat)
    check_attack(scenario, strat)
    build_plugins(scenario.client.plugins, scenario.client.plugin_settings)
    return scenario


#: ``[privacy]`` keys that only a private mechanism uses (set with ``mechanism = "none"``: refused)
_PRIVATE_ONLY = ("noise_multiplier", "max_epsilon")


def check_privacy(scenario: Scenario, strategy_cls: Any) -> None:
    """Privacy preflight: one source of truth for every privacy parameter (``[privacy]``), the
    mechanism/strategy combinations, and DP-SGD-compatible layers."""
    p = scenario.privacy
    table = scenario.client.plugin_settings("dp_sgd")
    if table:
        key = sorted(table)[0]
        target = f"privacy.{key}" if key in type(p).model_fields else "[privacy]"
        raise ConfigError(f"client.dp_sgd.{key}", "DP-SGD settings come only from [privacy]: a plugin table could "
                          "change noise, clipping or sampling behind the accountant's back",
                          f"remove [client.dp_sgd] and set {target} instead")
    plugins = strategy_cls.plugin_names(scenario)
    if "dp_sgd" in plugins and p.mechanism != "dp-sgd":
        raise ConfigError("client.plugins", "the dp_sgd plugin is enabled without privacy.mechanism = \"dp-sgd\", "
                          "so nothing would account for it", "set [privacy] mechanism = \"dp-sgd\" instead of "
                          "listing the plugin")
    if p.mechanism == "none":
        stray = [k for k in _PRIVATE_ONLY if getattr(p, k) != type(p).model_fields[k].default]
        if stray:
            raise ConfigError(f"privacy.{stray[0]}", "is set but privacy.mechanism = \"none\": nothing would add "
                              "noise or check a budget", "choose a privacy.mechanism or remove the key")
        return
    if p.mechanism == "dp-sgd":
        if strategy_cls.train_action != "train":
            raise ConfigError("privacy.mechanism", f"DP-SGD runs in the plain local training loop, but strategy "
                              f"'{strategy_cls.name}' trains clients with its own task ({strategy_cls.train_action})",
                              "use a strategy that trains with the plain loop (e.g. fedavg), or another mechanism")
        others = [n for n in plugins if n != "dp_sgd"]
        if others:
            raise ConfigError("client.plugins", f"DP-SGD cannot be combined with {others} yet: Opacus computes "
                              "per-sample gradients of the cross-entropy only, other loss terms would be dropped",
                              "remove the plugins or use privacy.mechanism = \"dp-fedavg\"")
        from fedsim.clients.plugins.dp_sgd import preflight
        from fedsim.data.federation import federation_of
        from fedsim.models import build_model

        fed = federation_of(scenario)
        preflight(build_model(scenario.model, tuple(fed.input_shape), int(fed.num_classes), 0))
    if p.mechanism in ("dp-fedavg", "dp-ftrl") and scenario.strategy.name not in ("dp_fedavg", "dp_ftrl"):
        raise ConfigError("strategy.name", f"privacy.mechanism = \"{p.mechanism}\" is a server strategy",
                          f"set strategy.name = \"{p.mechanism.replace('-', '_')}\"")
    if p.max_epsilon and p.noise_multiplier == 0:
        raise ConfigError("privacy.noise_multiplier", "a budget was set but the noise multiplier is 0 (ε = ∞)",
                          "set privacy.noise_multiplier > 0")
