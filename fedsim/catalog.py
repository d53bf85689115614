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
    build_plugins(scenario.client.plugins, scenario.client.plugin_settings)
    check_privacy(scenario)
    return scenario


def check_privacy(scenario: Scenario) -> None:
    """Privacy preflight: mechanism/strategy combinations and DP-SGD-compatible layers."""
    p = scenario.privacy
    if p.mechanism == "none":
        return
    if p.mechanism == "dp-sgd":
        others = [n for n in scenario.client.plugins if n != "dp_sgd"]
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
