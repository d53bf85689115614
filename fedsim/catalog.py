"""Imports every built-in strategy, plugin, client task, dataset and partitioner so that the
registries are complete, and checks a scenario's names against them."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

_LOADED = False

STRATEGY_MODULES = ("fedavg", "fedprox", "fedopt", "robust")


def load_all() -> None:
    """Import the modules whose import registers things (idempotent)."""
    global _LOADED
    if _LOADED:
        return
    import fedsim.clients.client_app  # noqa: F401  (the "fit" task)
    import fedsim.clients.plugins as plugins_pkg

    for mod in pkgutil.iter_modules(plugins_pkg.__path__):
        importlib.import_module(f"fedsim.clients.plugins.{mod.name}")
    import fedsim.strategies as strategies_pkg

    for mod in pkgutil.iter_modules(strategies_pkg.__path__):
        m = importlib.import_module(f"fedsim.strategies.{mod.name}")
        del m
    import fedsim.data.datasets  # noqa: F401
    import fedsim.data.partitioners  # noqa: F401
    import fedsim.models  # noqa: F401

    _LOADED = True


def registries() -> dict[str, Any]:
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


def check_scenario_names(scenario: Any) -> None:
    """Resolve every name in the scenario and validate strategy/plugin options now."""
    from fedsim.clients.plugin_api import build_plugins
    from fedsim.options import build_options

    reg = registries()
    strat = reg["strategies"].get(scenario.strategy.name, key="strategy.name")
    build_options(strat.Options, scenario.strategy.options(), "strategy")
    reg["datasets"].get(scenario.data.dataset, key="data.dataset")
    reg["partitioners"].get(scenario.data.partitioner, key="data.partitioner")
    reg["models"].get(scenario.model.name, key="model.name")
    build_plugins(scenario.client.plugins, scenario.client.plugin_settings)
