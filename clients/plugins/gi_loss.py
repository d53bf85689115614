"""Gradient-interpolation (GI) loss and TReLU for data that drift with time, as a client plugin.

Reference
---------
Nasery, Thakur, Piratla, De, Sarawagi, "Training for the Future: A Simple Gradient Interpolation Loss
to Generalize Along Time", NeurIPS 2021 (arXiv 2108.06721); official code anshuln/Training-for-the-Future
(``src/GI/trainer_GI.py::adversarial_finetune``). Spec: ``client-plugins.md`` §B.6.

The model sees the normalised time ``t`` as the **last input feature** (the ``drift`` dataset puts it
there; an ``npz`` file must too). With ``f(x, t)`` the logits at time ``t``, the GI term is
``GI(δ) = ℓ(f(x, t − δ) + δ · ∂_t f(x, t − δ), y)``: a first-order extrapolation from ``δ`` in the past
must still classify ``x``. ``δ*`` maximises it over ``|δ| ≤ Δ``: one ``δ`` per batch, as in the
reference, from ``δ₀ ~ U(−0.1, 0.1)``, ``ascent_steps`` steps ``δ ← δ + ascent_lr · ∂GI/∂δ``, stopped
early when ``|∂GI/∂δ| < 10⁻³`` or ``|δ| > Δ``, then clipped to ``[−Δ, Δ]``. ``∂_t f`` is taken per logit
with ``create_graph=True`` (double backward: the ascent differentiates through it, and so does the
training gradient). The training loss is ``weight · GI(δ*) + lam · ℓ(f(x, t), y)`` (reference:
``weight = 1``, ``lam = 0.5``); the plugin adds the term ``"gi_loss" = weight·GI + (lam − 1)·ce`` to the
loop's ``"ce"``. ``ℓ`` is the cross-entropy of the logits (the reference applies a softmax and its
classification loss). ``weight = 0, lam = 1`` is neutral.

**TReLU** (``trelu = true``): every ``ReLU`` after a ``Linear`` becomes ``y = h − τ(t)`` where
``h > τ(t)``, else ``α(t)(h − τ(t))``, with per-unit linear heads ``τ(t)``, ``α(t)`` initialised to
zero (exactly a ReLU at first). The heads are **client-local**: they are new parameters the server's
model does not have (the state-dict keys the server sees never change; the surgery is undone at
``ROUND_END``), so they are persisted per client across rounds in ``context.state`` and the server's
central evaluation measures the shared network with plain ReLUs. Use it to study local adaptation;
the central ``test_accuracy`` does not include it.

Randomness: ``δ₀`` comes from ``torch_generator(seed, "gi_loss", round, client)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.surgery import Undo, replace_modules
from fedsim.errors import ConfigError
from fedsim.rng import torch_generator

__all__ = ["GILoss", "TReLU", "TimeSource", "gi_term", "model_forward", "relu_widths", "search_delta", "time_derivative",
           "with_time"]

#: datasets whose last feature is the normalised time (npz: the user's file must put it there)
TIME_DATASETS = ("drift", "npz")

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TimeSource:
    """The current batch's times, read by every :class:`TReLU` during a forward pass."""

    def __init__(self) -> None:
        self.t: torch.Tensor | None = None


class TReLU(nn.Module):
    """``h − τ(t)`` above the threshold ``τ(t)``, ``α(t)(h − τ(t))`` below; per-unit linear heads of ``t``."""

    def __init__(self, width: int, source: TimeSource) -> None:
        super().__init__()
        self.source = source
        self.tau = nn.Linear(1, width)
        self.alpha = nn.Linear(1, width)
        for p in (*self.tau.parameters(), *self.alpha.parameters()):
            nn.init.zeros_(p)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = self.source.t
        if t is None:
            raise RuntimeError("TReLU needs the batch's time (TimeSource.t) before the forward pass")
        t = t.reshape(-1, 1).to(h.dtype)
        shifted = h - self.tau(t)
        return torch.where(shifted > 0, shifted, self.alpha(t) * shifted)


def with_time(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x`` with its last (flattened) feature replaced by ``t`` (one time per sample)."""
    flat = x.reshape(x.shape[0], -1)
    return torch.cat([flat[:, :-1], t.reshape(-1, 1).to(flat.dtype)], dim=1).reshape(x.shape)


def model_forward(model: nn.Module, source: TimeSource | None = None) -> Forward:
    """``(x, t) -> model(with_time(x, t))``, telling TReLUs (through ``source``) the same ``t``."""
    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if source is not None:
            source.t = t
        return model(with_time(x, t))
    return forward


def time_derivative(forward: Forward, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x, t), ∂_t f(x, t))`` per sample and logit, both ``[B, C]``, differentiable (create_graph)."""
    if not t.requires_grad:
        t = t.detach().requires_grad_(True)
    out = forward(x, t)
    cols = [torch.autograd.grad(out[:, c].sum(), t, create_graph=True)[0] for c in range(out.shape[1])]
    return out, torch.stack(cols, dim=1)


def gi_term(forward: Forward, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
            loss_fn=nn.functional.cross_entropy) -> torch.Tensor:
    """``ℓ(f(x, t − δ) + δ · ∂_t f(x, t − δ), y)`` (``δ`` a scalar tensor or one per sample)."""
    past = t.detach() - delta  # differentiable in δ while δ is searched
    out, slope = time_derivative(forward, x, past)
    d = delta.reshape(-1, 1) if isinstance(delta, torch.Tensor) and delta.dim() else delta
    return loss_fn(out + d * slope, y)


def search_delta(forward: Forward, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, max_delta: float,
                 steps: int, lr: float, generator: torch.Generator | None = None,
                 loss_fn=nn.functional.cross_entropy) -> torch.Tensor:
    """``δ*`` (a detached scalar in ``[−Δ, Δ]``) by gradient ascent on :func:`gi_term` (reference rule)."""
    delta = (torch.rand((), generator=generator) * 0.2 - 0.1).to(x.device, t.dtype)
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(gi_term(forward, x, t, y, delta, loss_fn), delta)
        delta = delta + lr * g
        if float(g.abs()) < 1e-3 or float(delta.abs()) > max_delta:
            break
    return delta.detach().clamp(-max_delta, max_delta)


def relu_widths(model: nn.Module) -> dict[str, int]:
    """``{name of a ReLU: width}`` for every ``nn.ReLU`` that directly follows an ``nn.Linear`` in a Sequential."""
    widths: dict[str, int] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            last = None
            for child_name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    last = child.out_features
                elif isinstance(child, nn.ReLU) and last is not None:
                    widths[f"{prefix}.{child_name}" if prefix else child_name] = last
    return widths


@register_plugin
class GILoss(ClientPlugin):
    """Gradient-interpolation loss (+ optional client-local TReLU); ``weight = 0, lam = 1`` is neutral."""

    name = "gi_loss"
    events = frozenset({Event.ROUND_START, Event.BEFORE_FORWARD, Event.LOSS, Event.ROUND_END})
    tiny_overrides = ('data.dataset="drift"',)
    bench_scenario = "temporal_drift"
    bench_overrides = ('client.plugins=["gi_loss"]',)
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        weight: float = 1.0  # weight of GI(δ*)
        lam: float = 0.5  # weight of the plain loss ℓ(f(x, t), y)
        max_delta: float = 0.15  # Δ
        ascent_steps: int = 10
        ascent_lr: float = 0.1
        trelu: bool = False  # client-local TReLU heads (never seen by the server)

        def __post_init__(self) -> None:
            if self.weight < 0 or self.lam < 0 or self.weight + self.lam == 0:
                raise ValueError(f"weight and lam must be >= 0 and not both 0, got {self.weight}, {self.lam}")
            if self.max_delta < 0 or self.ascent_steps < 0 or self.ascent_lr < 0:
                raise ValueError("max_delta, ascent_steps and ascent_lr must be >= 0")

        @classmethod
        def neutral(cls) -> "GILoss.Settings":
            return cls(weight=0.0, lam=1.0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.source = TimeSource()
        self._undo: Undo | None = None
        self._heads: dict[str, torch.Tensor] = {}
        self._gen: torch.Generator | None = None
        self._deltas: list[float] = []

    def active(self) -> bool:
        """Whether the settings change anything (the neutral setting touches nothing, reads no time)."""
        s = self.settings
        return bool(s.weight or s.lam != 1 or s.trelu)

    def preflight(self, scenario: Any) -> None:
        if not self.active():
            return
        if scenario.data.dataset not in TIME_DATASETS:
            raise ConfigError("data.dataset", f"gi_loss reads the time from the last input feature, and dataset "
                              f"'{scenario.data.dataset}' has none", f"use one of {list(TIME_DATASETS)} (an npz "
                              "file with the normalised time as its last feature)")
        if self.settings.trelu and scenario.model.name != "mlp":
            raise ConfigError("model.name", "gi_loss's TReLU replaces the ReLUs after Linear layers of an MLP",
                              "use model.name = \"mlp\" or client.gi_loss.trelu = false")

    def state_dict(self) -> dict[str, Any]:
        return dict(self._heads)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._heads = {k: torch.as_tensor(v) for k, v in state.items()}

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if not self.active():
            return
        if event is Event.ROUND_START:
            self._gen = torch_generator(state.seed, self.name, state.round, state.client_id)
            self._deltas = []
            if s.trelu:
                self._swap_in(state)
        elif event is Event.BEFORE_FORWARD:
            self.source.t = state.batch[0].reshape(state.batch[0].shape[0], -1)[:, -1]
        elif event is Event.LOSS and (s.weight or s.lam != 1):
            term = (s.lam - 1) * state.loss_terms["ce"]
            if s.weight:
                x, y = state.batch
                t = x.reshape(x.shape[0], -1)[:, -1]
                forward = model_forward(state.model, self.source)
                delta = search_delta(forward, x, t, y, s.max_delta, s.ascent_steps, s.ascent_lr, self._gen,
                                     state.loss_fn)
                self._deltas.append(float(delta))
                term = term + s.weight * gi_term(forward, x, t, y, delta, state.loss_fn)
                self.source.t = t
            state.add_loss(self.name, term)
        elif event is Event.ROUND_END:
            if self._deltas:
                state.metrics[f"{self.name}/mean_abs_delta"] = sum(map(abs, self._deltas)) / len(self._deltas)
            if self._undo is not None:
                self._heads = {k: v.detach().clone() for k, v in self._trelu_state(state.model).items()}
                self._undo()
                self._undo = None
            self.source.t = None

    def _swap_in(self, state: TrainState) -> None:
        widths = relu_widths(state.model)
        made: dict[str, TReLU] = {}

        def make_for(name: str) -> TReLU:
            made[name] = TReLU(widths[name], self.source).to(state.device)
            return made[name]

        name_of = {id(m): n for n, m in state.model.named_modules() if n in widths}
        self._undo = replace_modules(state.model, state.optimizer, lambda n, m: n in widths,
                                     lambda m: make_for(name_of[id(m)]))
        with torch.no_grad():
            for name, module in made.items():
                for k, p in module.named_parameters():
                    saved = self._heads.get(f"{name}.{k}")
                    if saved is not None:
                        p.copy_(saved.reshape(p.shape))

    @staticmethod
    def _trelu_state(model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": p for name, m in model.named_modules() if isinstance(m, TReLU)
                for k, p in m.named_parameters()}
