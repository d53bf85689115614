"""Client plugin interface: event-driven techniques composed into one local training loop.

Design (Composer-style events, Lightning-style state):

* A plugin subscribes to :class:`Event` values and mutates the :class:`TrainState` the loop owns.
* Loss terms are added **by name** to ``state.loss_terms`` (never overwritten); the loss is their sum.
* At most one plugin owns ``"sampler"`` and at most one owns ``"step"``; a conflict fails at build time.
* ``AFTER_*``, ``EPOCH_END`` and ``ROUND_END`` events run in reverse registration order, so a plugin can
  undo on the way out what it did on the way in.
* Every plugin has a neutral setting (``Settings.neutral()``) that reproduces the plain run exactly.
* Plugin state that must survive between rounds goes through ``state_dict``/``load_state_dict`` and is
  stored in Flower's ``context.state`` by the ClientApp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import torch

from fedsim.errors import ConfigError
from fedsim.options import build_options
from fedsim.registry import Registry


class Event(str, Enum):
    """The points of the local training loop (:func:`fedsim.clients.trainer.train_local`) where plugins run.

    One client's local round, as pseudo-code; each ``# EVENT`` line is where that event fires::

        # ROUND_START        (state.model / optimizer / loss_fn may be replaced, e.g. wrapped by DP-SGD)
        for epoch in range(epochs):
            # EPOCH_START
            order = randperm(n)
            # SAMPLER          (may replace state.order, or set state.batches to explicit index batches)
            batches = state.batches or split(order, batch_size)
            for idx in batches:
                state.batch = (x[idx], y[idx])
                # BATCH            (may replace state.batch)
                bx, by = state.batch
                # BEFORE_FORWARD
                outputs = state.model(bx)
                # AFTER_FORWARD
                loss_terms = {"ce": loss_fn(outputs, by)}
                # LOSS             (add named terms with state.add_loss)
                loss = sum(loss_terms.values())
                state.optimizer.zero_grad(); loss.backward()
                # AFTER_BACKWARD
                # BEFORE_STEP
                # STEP             (only the plugin that owns "step"; without one: state.optimizer.step())
                # AFTER_STEP
                step += 1
                if state.stop or step reached max_steps: break
            # EPOCH_END
            if state.stop or step reached max_steps: break
        # ROUND_END          (undo ROUND_START; write state.metrics)

    Every event except ``STEP`` goes to each plugin that lists it in ``events``, in plugin order;
    ``AFTER_*``, ``EPOCH_END`` and ``ROUND_END`` go in reverse order (see :data:`REVERSED_EVENTS`).
    ``SAMPLER`` goes to every subscriber, although by convention only the plugin that owns
    ``"sampler"`` changes the order.

    Attributes:
        ROUND_START: Once, before the first epoch; the global weights and the server's round config
            are in ``state``.
        EPOCH_START: At the start of each epoch, before its sample order is drawn.
        SAMPLER: After the epoch's random order is drawn into ``state.order``, before batching.
        BATCH: After a batch's tensors are sliced into ``state.batch``, before the forward pass.
        BEFORE_FORWARD: Immediately before ``state.model`` is called on the batch.
        AFTER_FORWARD: Immediately after the forward pass; ``state.outputs`` holds the logits.
        LOSS: After the cross-entropy term ``"ce"`` is computed; plugins add their own named terms.
        AFTER_BACKWARD: After ``loss.backward()``; gradients are in the parameters' ``.grad``.
        BEFORE_STEP: Immediately before the optimizer step.
        STEP: Replaces ``optimizer.step()``; sent only to the plugin that owns ``"step"``.
        AFTER_STEP: After the optimizer step, before the step counter and the stop check.
        EPOCH_END: At the end of each epoch, also when ``max_steps`` or ``state.stop`` ends it early.
        ROUND_END: Once, after the last epoch (also after an early stop); plugins undo what they did
            at ``ROUND_START`` and write ``state.metrics``.
    """

    ROUND_START = "round_start"
    EPOCH_START = "epoch_start"
    SAMPLER = "sampler"
    BATCH = "batch"
    BEFORE_FORWARD = "before_forward"
    AFTER_FORWARD = "after_forward"
    LOSS = "loss"
    AFTER_BACKWARD = "after_backward"
    BEFORE_STEP = "before_step"
    STEP = "step"
    AFTER_STEP = "after_step"
    EPOCH_END = "epoch_end"
    ROUND_END = "round_end"


REVERSED_EVENTS = frozenset(
    {Event.AFTER_FORWARD, Event.AFTER_BACKWARD, Event.AFTER_STEP, Event.EPOCH_END, Event.ROUND_END}
)


@dataclass
class TrainState:
    """Everything the loop knows about one client's local round; plugins read and mutate it.

    ``model`` and ``optimizer`` may be replaced by a plugin at ``ROUND_START`` (e.g. DP-SGD wraps
    them); the loop always uses the current ones.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    round: int
    client_id: int
    seed: int
    rng: torch.Generator
    config: dict[str, Any]
    batch_size: int
    epochs: int
    max_steps: int = 0
    progress: float = 0.0  # 0..1 over the whole federated run
    epoch: int = 0
    step: int = 0
    order: torch.Tensor | None = None  # sample order of the current epoch (SAMPLER may replace it)
    batches: list[torch.Tensor] | None = None  # SAMPLER may set explicit index batches (any sizes)
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    outputs: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    samples_seen: int = 0
    stop: bool = False

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        """Add a named loss term; a second term with the same name is an error (never overwritten)."""
        if name in self.loss_terms:
            raise RuntimeError(f"loss term '{name}' was added twice in one step; use a distinct name")
        self.loss_terms[name] = value


class ClientPlugin:
    """Base class of client plugins. Subclasses set the class variables and implement :meth:`on`.

    Class variables
    ---------------
    name : registry name (lowercase)
    events : the events this plugin handles
    owns : subset of {"sampler", "step"} this plugin takes over
    after : names of plugins that must run before this one (when both are enabled)
    Settings : a dataclass of settings with defaults; ``Settings.neutral()`` gives the neutral setting
    """

    name: ClassVar[str] = ""
    events: ClassVar[frozenset[Event]] = frozenset()
    owns: ClassVar[frozenset[str]] = frozenset()
    after: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True)
    class Settings:
        @classmethod
        def neutral(cls) -> Any:
            return cls()

    def __init__(self, settings: Any | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()

    def on(self, event: Event, state: TrainState) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


PLUGINS: Registry = Registry("plugin")


def register_plugin(cls: type[ClientPlugin]) -> type[ClientPlugin]:
    """Class decorator registering a plugin under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty class attribute 'name'")
    return PLUGINS.register(cls.name)(cls)


def make_settings(cls: type[ClientPlugin], values: dict[str, Any]) -> Any:
    """Validate ``values`` against ``cls.Settings``; errors name ``client.<plugin>.<key>``."""
    return build_options(cls.Settings, values, f"client.{cls.name}")


class PluginStack:
    """An ordered set of plugins with precomputed per-event dispatch lists."""

    def __init__(self, plugins: Sequence[ClientPlugin]) -> None:
        self.plugins = _order(list(plugins))
        self.owner: dict[str, ClientPlugin] = {}
        for p in self.plugins:
            for cap in p.owns:
                if cap in self.owner:
                    raise ConfigError(
                        "client.plugins",
                        f"plugins '{self.owner[cap].name}' and '{p.name}' both take over the {cap}",
                        "enable only one of them, or compose them in one plugin",
                    )
                self.owner[cap] = p
        self._dispatch: dict[Event, list[ClientPlugin]] = {}
        for ev in Event:
            subs = [p for p in self.plugins if ev in p.events]
            self._dispatch[ev] = subs[::-1] if ev in REVERSED_EVENTS else subs

    def fire(self, event: Event, state: TrainState) -> None:
        for p in self._dispatch[event]:
            p.on(event, state)

    def __len__(self) -> int:
        return len(self.plugins)


def _order(plugins: list[ClientPlugin]) -> list[ClientPlugin]:
    """Stable topological order honouring each plugin's ``after`` constraints."""
    names = [p.name for p in plugins]
    placed: list[ClientPlugin] = []
    pending = list(plugins)
    while pending:
        for p in pending:
            if all(dep not in names or dep in [q.name for q in placed] for dep in p.after):
                placed.append(p)
                pending.remove(p)
                break
        else:
            raise ConfigError("client.plugins", f"ordering constraints form a cycle among {names}")
    return placed


def build_plugins(names: Iterable[str], settings: Callable[[str], dict[str, Any]]) -> PluginStack:
    """Instantiate the named plugins with validated settings (``settings(name)`` gives the raw table)."""
    made = []
    for name in names:
        cls = PLUGINS.get(name, key="client.plugins")
        made.append(cls(make_settings(cls, settings(name))))
    return PluginStack(made)


def to_numpy_state(state: dict[str, Any]) -> dict[str, Any]:
    """Convert plugin state values to NumPy arrays / Python scalars for ``context.state``."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu().numpy()
        elif isinstance(v, np.ndarray) or isinstance(v, (int, float, str, bool)):
            out[k] = v
        else:
            raise TypeError(f"plugin state '{k}' has unsupported type {type(v).__name__}")
    return out
