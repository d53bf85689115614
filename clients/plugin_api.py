"""Client plugin interface: event-driven techniques composed into one local training loop.

Design (Composer-style events, Lightning-style state):

* A plugin subscribes to :class:`Event` values and mutates the :class:`TrainState` the loop owns.
* Loss terms are added **by name** to ``state.loss_terms`` (never overwritten); the loss is their sum.
* At most one plugin owns each of ``"sampler"``, ``"step"`` and ``"forward"``; a conflict fails at build time.
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

        # INIT               (only the first time this client runs the plugin; later rounds restore its state)
        # ROUND_START        (state.model / optimizer / loss_fn may be replaced, e.g. wrapped by DP-SGD)
        for epoch in range(epochs):
            # EPOCH_START
            order = randperm(n)
            # SAMPLER          (may replace state.order, or set state.batches to explicit index batches)
            batches = state.batches or split(order, batch_size)
            for idx in batches:
                state.batch_indices = idx      (positions in the client's data)
                state.batch = (x[idx], y[idx])
                # BATCH            (may replace state.batch)
                bx, by = state.batch
                if no plugin owns "forward":
                    # BEFORE_FORWARD
                    outputs = state.model(bx)
                    # AFTER_FORWARD
                    loss_terms = {"ce": loss_fn(outputs, by)}
                    # LOSS             (add named terms with state.add_loss)
                    loss = sum(loss_terms.values())
                    state.optimizer.zero_grad(); loss.backward()
                else:            (the owner's forward_backward(state, forward_loss); forward_loss(bx, by) runs
                                  BEFORE_FORWARD .. LOSS above on any part of the batch and returns its loss)
                # AFTER_BACKWARD
                # BEFORE_STEP
                # STEP             (only the plugin that owns "step"; without one: state.optimizer.step())
                # AFTER_STEP
                step += 1; progress advances
                if state.stop or step reached max_steps: break
            # EPOCH_END
            if state.stop or step reached max_steps: break
        # PROBE              (diagnostics; model, buffers, grads and state.rng are restored afterwards)
        # ROUND_END          (undo ROUND_START; write state.metrics)

    Every event except ``STEP`` goes to each plugin that lists it in ``events``, in plugin order;
    ``AFTER_*``, ``EPOCH_END`` and ``ROUND_END`` go in reverse order (see :data:`REVERSED_EVENTS`).
    ``SAMPLER`` goes to every subscriber, although by convention only the plugin that owns
    ``"sampler"`` changes the order.

    Attributes:
        INIT: Once per client over the whole run, before its first ``ROUND_START``: the plugin meets
            this client for the first time (no saved state). In later rounds the plugin's state comes
            back through ``load_state_dict`` instead.
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
            (The plugin that owns ``"forward"`` gets no event of its own: the loop calls its
            :meth:`ClientPlugin.forward_backward` in place of forward, loss and backward; it must leave
            the batch's gradients in ``.grad`` and set ``state.outputs``, ``state.loss_terms``,
            ``state.loss`` for the whole batch, and fire ``BEFORE_FORWARD`` .. ``LOSS`` through the
            callable it is given, once per part of the batch it computes.)
        AFTER_STEP: After the optimizer step, before the step counter and the stop check.
        EPOCH_END: At the end of each epoch, also when ``max_steps`` or ``state.stop`` ends it early.
        PROBE: Once, after the last epoch and before ``ROUND_END``, to plugins that measure without
            training (diagnostics). The loop snapshots the parameters, buffers and ``state.rng`` before
            and restores them after, and clears gradients, so a probe can never change the result;
            probes draw randomness from ``state.probe_rng``.
        ROUND_END: Once, after the last epoch (also after an early stop); plugins undo what they did
            at ``ROUND_START`` and write ``state.metrics``.
    """

    INIT = "init"
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
    PROBE = "probe"
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
    #: 0..1 over the whole federated run, advanced after every local step (never restarts per round)
    progress: float = 0.0
    #: the share of the run one local round spans (1 / run.rounds); progress moves across it step by step
    progress_span: float = 0.0
    #: local steps this round is planned to take (epochs x batches, capped by max_steps)
    planned_steps: int = 0
    epoch: int = 0
    step: int = 0
    order: torch.Tensor | None = None  # sample order of the current epoch (SAMPLER may replace it)
    #: SAMPLER may set explicit index batches (any sizes): a list, or an iterable the loop reads lazily,
    #: one batch per step (so a choice can depend on the steps before it, as hard_batches' does)
    batches: Iterable[torch.Tensor] | None = None
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    batch_indices: torch.Tensor | None = None  # positions of the batch's samples in (x, y)
    #: received global parameters (detached copies), present when a plugin ``needs`` "global_params"
    global_params: dict[str, torch.Tensor] | None = None
    probe_rng: torch.Generator | None = None
    create_graph: bool = False  # loss.backward(create_graph=True), when a plugin needs "create_graph"
    outputs: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    samples_seen: int = 0
    stop: bool = False

    def round_fraction(self) -> float:
        """How far into this local round the loop is (0..1), by steps taken over planned steps."""
        return min(self.step / self.planned_steps, 1.0) if self.planned_steps else 0.0

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
    owns : subset of {"sampler", "step", "forward"} this plugin takes over ("forward": the loop calls
        :meth:`forward_backward` instead of its own forward pass, loss and backward pass)
    needs : capabilities the loop turns on only when asked: "global_params" (``state.global_params``),
        "create_graph" (double backward through the loss)
    after : names of plugins that must run before this one (when both are enabled)
    Settings : a dataclass of settings with defaults; ``Settings.neutral()`` gives the neutral setting
    tiny_overrides : ``--set`` items the registry tests add to their tiny scenario for this plugin
    bench_scenario, bench_overrides, bench_metric : the built-in scenario (with overrides, which
        enable the plugin) that suits the technique, and the metric its effect is judged by
        (``bench/plugin_effects.py`` runs it against the same scenario without the plugin)
    """

    name: ClassVar[str] = ""
    events: ClassVar[frozenset[Event]] = frozenset()
    owns: ClassVar[frozenset[str]] = frozenset()
    needs: ClassVar[frozenset[str]] = frozenset()
    after: ClassVar[tuple[str, ...]] = ()
    tiny_overrides: ClassVar[tuple[str, ...]] = ()
    bench_scenario: ClassVar[str] = "default"
    bench_overrides: ClassVar[tuple[str, ...]] = ()
    bench_metric: ClassVar[str] = "test_accuracy"

    @dataclass(frozen=True)
    class Settings:
        @classmethod
        def neutral(cls) -> Any:
            return cls()

    def __init__(self, settings: Any | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()

    def on(self, event: Event, state: TrainState) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def forward_backward(self, state: TrainState,
                         forward_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Only for a plugin that owns ``"forward"``: compute the gradients of ``state.batch``.

        ``forward_loss(bx, by)`` fires ``BEFORE_FORWARD``, runs ``state.model``, fires ``AFTER_FORWARD``,
        builds ``state.loss_terms`` (``"ce"`` + ``LOSS`` terms) and returns their sum; the owner zeroes the
        gradients, calls it on the parts of the batch it chooses, back-propagates (with
        ``create_graph=state.create_graph``) and finally sets ``state.outputs``, ``state.loss_terms`` and
        ``state.loss`` for the whole batch.
        """
        raise NotImplementedError(f"plugin '{self.name}' owns \"forward\" but has no forward_backward")

    def preflight(self, scenario: Any) -> None:
        """Refuse, before the run, a scenario this plugin cannot honour (raise ``ConfigError`` naming the
        key); called by :func:`fedsim.catalog.resolve` for every plugin of the stack. Default: nothing."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


PLUGINS: Registry = Registry("plugin", base=ClientPlugin)  # base: what a `module:object` plugin must be


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
        self.needs: frozenset[str] = frozenset().union(*(p.needs for p in self.plugins))
        #: names of the plugins that meet this client for the first time (INIT goes to them only);
        #: the ClientApp sets it from the client's saved state, a bare stack initialises every plugin
        self.first_visit: set[str] = {p.name for p in self.plugins}
        #: when a list, every dispatched ``(event, plugin name)`` is appended (tests, debugging)
        self.trace: list[tuple[str, str]] | None = None

    def fire(self, event: Event, state: TrainState) -> None:
        subs = self._dispatch[event]
        if event is Event.INIT:
            subs = [p for p in subs if p.name in self.first_visit]
        for p in subs:
            if self.trace is not None:
                self.trace.append((event.value, p.name))
            p.on(event, state)

    def has(self, event: Event) -> bool:
        """Whether any plugin handles ``event``."""
        return bool(self._dispatch[event])

    def hook(self, event: Event) -> Callable[[TrainState], None]:
        """``fire`` bound to ``event`` for the loop's per-step events; a no-op where no plugin handles
        ``event`` (the stack's subscriptions are fixed when it is built), so an unused event costs nothing."""
        if not self._dispatch[event]:
            return _nobody
        return lambda state: self.fire(event, state)

    def __len__(self) -> int:
        return len(self.plugins)


def _nobody(state: TrainState) -> None:
    """What :meth:`PluginStack.hook` gives for an event no plugin handles."""


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
