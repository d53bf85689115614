"""The resolver step: fills every registry and checks a scenario's names against them.

The schema (``fedsim.config``) only validates values; the entry points (the CLI, the engines, the
Flower app objects) call :func:`resolve` once before anything runs, so a typo in a strategy,
plugin, dataset, partitioner or model name — or an invalid strategy/plugin option — fails with a
typed error naming the key. :func:`load_all` is the one place that imports every built-in strategy,
plugin, client task, dataset, partitioner and model module (their import registers them), then the
extensions installed as Python entry points (groups ``fedsim.strategies``, ``fedsim.plugins``,
``fedsim.models``, ``fedsim.datasets``, ``fedsim.partitioners``; see :mod:`fedsim.registry`, which also
resolves ``module:object`` names).
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
    from fedsim.strategies.base import STRATEGIES

    STRATEGIES.adopt = adopt_strategy  # `module:object` and `flwr:Name` strategies (fedsim.registry)
    _LOADED = True
    for registry in registries().values():  # extensions installed as Python entry points (fedsim.<kind>s)
        registry.load_entry_points()


def adopt_strategy(name: str, obj: Any) -> Any:
    """The strategy class a ``module:object`` (or entry point) ``name`` stands for: a
    :class:`~fedsim.strategies.base.FedSimStrategy` subclass as it is, a Flower
    ``flwr.serverapp.strategy.Strategy`` subclass run through :mod:`fedsim.strategies.flwr_adapter`;
    ``TypeError`` saying why for anything else."""
    from flwr.serverapp.strategy import Strategy

    from fedsim.strategies.base import FedSimStrategy
    from fedsim.strategies.flwr_adapter import flower_strategy_class

    if isinstance(obj, type) and issubclass(obj, FedSimStrategy):
        if not obj.name:
            raise TypeError(f"{obj.__qualname__} needs a non-empty class attribute 'name'")
        return obj
    if isinstance(obj, type) and issubclass(obj, Strategy):
        return flower_strategy_class(obj, name)
    raise TypeError("a strategy is a subclass of fedsim.strategies.base.FedSimStrategy or of Flower's "
                    "flwr.serverapp.strategy.Strategy")


def registries() -> dict[str, Any]:
    """Every registry, complete: strategies, plugins, gradient transforms, partitioners, datasets, models."""
    load_all()
    from fedsim.clients.plugin_api import PLUGINS
    from fedsim.clients.transforms import TRANSFORMS
    from fedsim.data.datasets import DATASETS
    from fedsim.data.partitioners import PARTITIONERS
    from fedsim.models import MODELS
    from fedsim.strategies.base import STRATEGIES

    return {"strategies": STRATEGIES, "plugins": PLUGINS, "transforms": TRANSFORMS, "partitioners": PARTITIONERS,
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
    # the whole stack a client will build (the scenario's, the strategy's, DP-SGD): conflicts such as two
    # sampler or step owners fail here, before the run, naming both plugins
    from fedsim.clients.tasks import dp_sgd_settings

    stack = build_plugins(strat.plugin_names(scenario), lambda n: dp_sgd_settings(scenario) if n == "dp_sgd"
                          else scenario.client.plugin_settings(n))
    for plugin in stack.plugins:  # what a plugin cannot honour with this scenario (e.g. no BatchNorm to ghost)
        plugin.preflight(scenario)
    return scenario


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
    if p.mechanism == "none":  # any other [privacy] setting is refused by the schema (fedsim.config_hints)
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
    from fedsim.privacy.calibration import apply_target_epsilon

    apply_target_epsilon(scenario, strategy_cls)  # privacy.target_epsilon sets privacy.noise_multiplier, in place
    if p.max_epsilon and p.noise_multiplier == 0:
        raise ConfigError("privacy.noise_multiplier", "a budget was set but the noise multiplier is 0 (ε = ∞)",
                          "set privacy.noise_multiplier > 0")
