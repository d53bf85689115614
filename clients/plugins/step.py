"""The ``step`` plugin: the local optimizer as a chain of Optax-style gradient transforms.

Anchor: Optax (``optax/_src/base.py``, ``combine.py``; spec ``client-plugins.md`` §A) — an optimizer is
``chain(t_1, ..., t_n)`` of ``init/update`` pairs (:mod:`fedsim.clients.transforms`). The plugin owns
``"step"``: after the backward pass it feeds the gradients through the chain and applies
``p ← p − η·d`` with ``p.add_(d, alpha=-η)``, ``η = client.lr`` (``η = 1`` when the chain ends with a
transform that chooses its own step length, ``gns_newton``; then ``client.lr`` has no effect).

Scenario shape::

    [client]
    plugins = ["step"]
    lr = 0.003
    [client.step]
    transforms = ["adam"]                                   # names, or tables with settings:
    # transforms = [{name = "frugal", density = 0.25, update_gap = 50}, "sgd"]
    reset_each_round = false

Each item is a transform name (``fedsim list`` lists them under ``transforms``) or an inline table
``{name = ..., <setting> = ...}``; errors name ``client.step.transforms[i].<setting>``. The client's
own optimizer is replaced, so ``client.optimizer`` must be ``"sgd"`` with ``momentum = 0`` and
``weight_decay = 0`` (use the ``momentum``, ``adam`` and ``weight_decay`` transforms instead).

State policy: by default the whole chain state persists per client across rounds (in Flower's
``context.state``): Adam moments and momentum buffers (the client's gradient statistics change slowly
from round to round, and a client sampled again resumes with warm moments instead of Adam's
bias-corrected cold start), step counters (bias correction continues; FRUGAL / DCT subspaces are
re-chosen every ``update_gap`` steps of the whole run, so the gap may exceed one round's local steps)
and ``gns_newton``'s γ (its running estimate of the smoothness). ``reset_each_round = true``
re-initialises the chain every round, as the plain loop does with its fresh ``torch.optim`` optimizer.

Neutral setting: ``transforms = ["sgd"]`` — ``p.add_(grad, alpha=-client.lr)``, which is what
``torch.optim.SGD`` does with no momentum and no weight decay: the plain run bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import fedsim.clients.transforms_lowrank  # noqa: F401  (registers frugal, dct_lowrank)
import fedsim.clients.transforms_newton  # noqa: F401  (registers normalized_gd, gns_newton)
from fedsim.clients.functional import batch_loss_fn, params_of
from fedsim.clients.plugin_api import PLUGINS, ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.transforms import Chain, State, build_chain, flatten_state, unflatten_state
from fedsim.clients.transforms_newton import dense_ggn
from fedsim.errors import ConfigError

KEY = "client.step.transforms"


def merge_state(base: State, loaded: State) -> State:
    """``loaded`` laid over a freshly initialised ``base``: empty dicts are not saved (a flat record has
    no entry for them), so they come back from ``base``; every saved tensor replaces the initial one
    (subspace bases and windows change size, so shapes are not compared)."""
    for k, v in loaded.items():
        base[k] = merge_state(base[k] if isinstance(base.get(k), dict) else {}, v) if isinstance(v, dict) else v
    return base


@register_plugin
class Step(ClientPlugin):
    """The local optimizer as a chain of gradient transforms (see the module docstring)."""

    name = "step"
    events = frozenset({Event.ROUND_START, Event.ROUND_END})
    owns = frozenset({"step"})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["step"]', "client.momentum=0.0", "client.lr=0.003",
                       'client.step.transforms=[{name="frugal", density=0.25, update_gap=50}]')
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        transforms: tuple = ("sgd",)
        reset_each_round: bool = False

        def __post_init__(self) -> None:
            object.__setattr__(self, "transforms", tuple(self.transforms))
            build_chain(self.transforms, KEY)  # every name and setting checked where the scenario is read

        @classmethod
        def neutral(cls) -> "Step.Settings":
            return cls(transforms=("sgd",), reset_each_round=False)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.chain: Chain = build_chain(self.settings.transforms, KEY)
        self.transform_state: State | None = None
        self._loaded: dict[str, Any] = {}

    # -- preflight and persistence ---------------------------------------------------------------------
    def preflight(self, scenario: Any) -> None:
        c = scenario.client
        if c.optimizer != "sgd" or c.momentum or c.weight_decay:
            raise ConfigError("client.optimizer", f"the step plugin replaces the client optimizer, so "
                              f"client.optimizer = {c.optimizer!r}, momentum = {c.momentum} and weight_decay = "
                              f"{c.weight_decay} would have no effect", "use client.optimizer = \"sgd\" with "
                              "momentum = 0 and weight_decay = 0, and the adam, momentum or weight_decay transforms")
        for i, t in enumerate(self.chain.transforms):
            t.preflight(scenario, f"{KEY}[{i}]")
        if self.chain.needs_closure:
            extra = [n for n in c.plugins if n != self.name and n in PLUGINS and Event.LOSS in PLUGINS.get(n).events]
            if extra:
                raise ConfigError(KEY, f"the chain re-evaluates the cross-entropy of the batch at trial points, "
                                  f"but plugins {extra} add loss terms it would not see", "remove those plugins "
                                  "or the closure transform (gns_newton)")

    def state_dict(self) -> dict[str, Any]:
        if self.settings.reset_each_round or self.transform_state is None:
            return {}
        return {f"t/{k}": v for k, v in flatten_state(self.transform_state).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = {k[2:]: v for k, v in state.items() if k.startswith("t/")}
        self.transform_state = None

    # -- the loop -----------------------------------------------------------------------------------------
    def on(self, event: Event, state: TrainState) -> None:
        if event is Event.ROUND_START:
            if self.transform_state is None or self.settings.reset_each_round:
                params = {k: v.detach() for k, v in params_of(state.model).items()}
                fresh = self.chain.init(params)
                if self._loaded and not self.settings.reset_each_round:
                    fresh = merge_state(fresh, unflatten_state(self._loaded, state.device))
                self.transform_state = fresh
        elif event is Event.STEP:
            self._step(state)
        elif event is Event.ROUND_END:
            for k, v in self.chain.metrics(self.transform_state or {}).items():
                state.metrics[f"{self.name}/{k}"] = float(v)

    def _step(self, state: TrainState) -> None:
        live = params_of(state.model)
        grads = {k: p.grad for k, p in live.items() if p.grad is not None}
        params = {k: p.detach() for k, p in live.items()}
        extra: dict[str, Any] = {"loss": None if state.loss is None else state.loss.detach()}
        if self.chain.needs_closure:
            if set(state.loss_terms) != {"ce"}:
                raise ConfigError(KEY, f"the chain re-evaluates only the cross-entropy at trial points, but this "
                                  f"step's loss has the terms {sorted(state.loss_terms)}",
                                  "remove the plugins that add loss terms, or the closure transform (gns_newton)")
            bx, by = state.batch
            extra["loss_at"] = batch_loss_fn(state.model, bx, by, state.loss_fn)
            extra["ggn_at"] = lambda p, names: dense_ggn(state.model, bx, by, state.loss_fn, p, names)
        directions, self.transform_state = self.chain.update(grads, self.transform_state, params, **extra)
        # read at every step: a plugin may scale the learning rate (ghost_bn's √-scaling does)
        eta = 1.0 if self.chain.sets_step_size else float(state.optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            for k, d in directions.items():
                live[k].add_(d, alpha=-eta)
