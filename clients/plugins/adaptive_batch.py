"""AdAdaGrad: AdaGrad / AdaGrad-Norm steps with a batch size grown by the norm or inner-product test.

Reference
---------
Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods", 2024
(arXiv 2402.11215); official code timlautk/AdAdaGrad (``tests.py``, ``adagradnorm.py``). The tests go
back to Byrd, Chin, Nocedal, Wu (2012, norm test) and Bollapragada, Byrd, Nocedal (2018, augmented
inner-product test). Spec: ``client-plugins.md`` §B.4.

With per-sample gradients ``g_i`` (``i = 1..m``) of the current batch, their mean ``ḡ`` and the unbiased
per-coordinate variance ``V_j``:

* **norm test** — ``b' = max(b, ⌈Σ_j V_j / (η² ‖ḡ‖²)⌉)``. With Cockpit's norm-test statistic
  ``θ_max² = Σ_j V_j / (b ‖ḡ‖²)`` this is ``b' = max(b, ⌈b θ_max² / η²⌉)``;
* **augmented inner-product test** — ``b' = max(b, ⌈max(Var_i⟨g_i, ḡ⟩ / (θ² ‖ḡ‖⁴),
  Σ_j Var_i(g_i − ⟨g_i, ḡ⟩ ḡ / ‖ḡ‖²)_j / (ν² ‖ḡ‖²))⌉)``.

The reference code sums these statistics over parameter tensors (inner products per tensor); here they
are taken over the whole flattened gradient, as the paper writes them. ``b`` never decreases, is capped
by ``b_max`` and the client's data size, and is persisted per client across rounds (``context.state``).

Steps (the plugin owns ``"step"``; the learning rate is ``client.lr``):

* ``adagrad_norm`` — one scalar accumulator: ``a ← a + ‖g‖²``, ``θ ← θ − η g / (√a + 10⁻¹⁰)`` with
  ``a₀ = initial_accumulator`` (the paper's AdaGrad-Norm; the reference ``adagradnorm.py`` keeps one
  accumulator per output row instead);
* ``adagrad`` — per coordinate: ``a ← a + g²``, ``θ ← θ − η g / (√a + 10⁻¹⁰)``;
* ``client`` — the scenario's own optimizer (``client.optimizer``), only the batch size adapts.

The accumulators restart each round, as the client's optimizer does. The sampler rebuilds the rest of
the epoch with the new ``b`` after every step (the loop iterates over the list the sampler set), so an
epoch still covers each sample once; the budget is counted in samples: a round processes at most the
samples the plain run would (``planned steps × client.batch_size``), then stops.

Neutral setting: ``optimizer = "client"``, ``test = "none"`` — the plain loop, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedsim.clients.functional import Params, params_of, per_sample_grads
from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.errors import ConfigError

__all__ = ["AdaptiveBatch", "adagrad_norm_step", "adagrad_step", "inner_product_test", "norm_test",
           "norm_test_statistic"]

_EPS = 1e-10


def _flat_samples(grads: Params | torch.Tensor) -> torch.Tensor:
    """Per-sample gradients as one ``[m, D]`` float64 matrix."""
    if isinstance(grads, torch.Tensor):
        return grads.reshape(grads.shape[0], -1).double()
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1).double()


def _grown(b: int, needed: float, cap: int) -> int:
    """``min(cap, max(b, ⌈needed⌉))`` (``needed`` may be ``inf``: the cap)."""
    if math.isnan(needed):
        return b
    return min(cap, max(b, math.ceil(needed) if math.isfinite(needed) else cap))


def norm_test_statistic(grads: Params | torch.Tensor) -> tuple[float, float]:
    """``(Σ_j V_j, ‖ḡ‖²)``: the summed unbiased per-coordinate variance and the squared mean norm."""
    g = _flat_samples(grads)
    if g.shape[0] < 2:
        raise ValueError("the variance of per-sample gradients needs at least 2 samples")
    return float(g.var(dim=0, correction=1).sum()), float(g.mean(dim=0).square().sum())


def norm_test(grads: Params | torch.Tensor, b: int, eta: float, cap: int) -> int:
    """Norm test: ``min(cap, max(b, ⌈Σ_j V_j / (η² ‖ḡ‖²)⌉))`` (``ḡ = 0`` with noise: the cap)."""
    var, mean_sq = norm_test_statistic(grads)
    needed = var / (eta ** 2 * mean_sq) if mean_sq > 0 else (math.inf if var > 0 else math.nan)
    return _grown(b, needed, cap)


def inner_product_test(grads: Params | torch.Tensor, b: int, theta: float, nu: float, cap: int) -> int:
    """Augmented inner-product test (inner-product and orthogonality conditions), capped at ``cap``."""
    g = _flat_samples(grads)
    if g.shape[0] < 2:
        raise ValueError("the variance of per-sample gradients needs at least 2 samples")
    mean = g.mean(dim=0)
    mean_sq = float(mean.square().sum())
    if mean_sq == 0:
        return _grown(b, math.inf if float(g.var(dim=0).sum()) > 0 else math.nan, cap)
    inner = g @ mean
    ortho = g - torch.outer(inner, mean) / mean_sq
    needed = max(float(inner.var(correction=1)) / (theta ** 2 * mean_sq ** 2),
                 float(ortho.var(dim=0, correction=1).sum()) / (nu ** 2 * mean_sq))
    return _grown(b, needed, cap)


@torch.no_grad()
def adagrad_norm_step(params: list[torch.Tensor], acc: torch.Tensor, lr: float) -> None:
    """AdaGrad-Norm: ``acc += ‖g‖²`` (all parameters together), ``p -= lr g / (√acc + 1e-10)``."""
    grads = [p.grad for p in params if p.grad is not None]
    acc += sum(g.double().square().sum() for g in grads)
    scale = lr / (float(acc.sqrt()) + _EPS)
    for p in params:
        if p.grad is not None:
            p.add_(p.grad, alpha=-scale)


@torch.no_grad()
def adagrad_step(params: list[torch.Tensor], accs: list[torch.Tensor], lr: float) -> None:
    """AdaGrad: per coordinate ``acc += g²``, ``p -= lr g / (√acc + 1e-10)``."""
    for p, a in zip(params, accs):
        if p.grad is not None:
            a.addcmul_(p.grad, p.grad)
            p.addcdiv_(p.grad, a.sqrt().add_(_EPS), value=-lr)


@register_plugin
class AdaptiveBatch(ClientPlugin):
    """AdAdaGrad(-Norm): adaptive steps and a batch size grown by a gradient-noise test."""

    name = "adaptive_batch"
    events = frozenset({Event.ROUND_START, Event.SAMPLER, Event.AFTER_BACKWARD, Event.AFTER_STEP,
                        Event.ROUND_END})
    owns = frozenset({"sampler", "step"})
    tiny_overrides = ("client.batch_size=4",)
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["adaptive_batch"]', "client.batch_size=4", "client.momentum=0.0",
                       "client.lr=0.1", 'client.adaptive_batch.optimizer="adagrad_norm"',
                       'client.adaptive_batch.test="norm"', "client.adaptive_batch.eta=0.5")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        optimizer: str = "adagrad_norm"  # adagrad_norm | adagrad | client
        test: str = "norm"  # norm | inner_product | none
        eta: float = 0.5  # norm test
        theta: float = 0.5  # inner-product test
        nu: float = 1.0  # orthogonality part of the augmented inner-product test
        b_max: int = 0  # cap on the batch size (0: the client's data size)
        max_test_samples: int = 256  # per-sample gradients of at most this many samples of a batch
        initial_accumulator: float = 0.01

        def __post_init__(self) -> None:
            if self.optimizer not in ("adagrad_norm", "adagrad", "client"):
                raise ValueError(f"optimizer must be adagrad_norm, adagrad or client, got {self.optimizer!r}")
            if self.test not in ("norm", "inner_product", "none"):
                raise ValueError(f"test must be norm, inner_product or none, got {self.test!r}")
            if min(self.eta, self.theta, self.nu) <= 0:
                raise ValueError(f"eta, theta and nu must be > 0, got {self.eta}, {self.theta}, {self.nu}")
            if self.b_max < 0 or self.max_test_samples < 2 or self.initial_accumulator < 0:
                raise ValueError("need b_max >= 0, max_test_samples >= 2 and initial_accumulator >= 0")

        @classmethod
        def neutral(cls) -> "AdaptiveBatch.Settings":
            return cls(optimizer="client", test="none")

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.b = 0  # current batch size (0: not set yet, client.batch_size)
        self._batches: list[torch.Tensor] = []
        self._order: torch.Tensor | None = None
        self._taken = 0  # samples of the epoch's order in batches that already ran
        self._pos = 0  # batches of the epoch that already ran
        self._budget = 0
        self._acc: Any = None
        self._tests = 0
        self._grew = 0

    def preflight(self, scenario: Any) -> None:
        c = scenario.client
        if self.settings.optimizer != "client" and (c.optimizer != "sgd" or c.momentum or c.weight_decay):
            raise ConfigError("client.optimizer", f"adaptive_batch's {self.settings.optimizer} step replaces the "
                              f"client optimizer, so client.optimizer = {c.optimizer!r}, momentum = {c.momentum} "
                              f"and weight_decay = {c.weight_decay} would have no effect",
                              "use client.optimizer = \"sgd\" with momentum = 0 and weight_decay = 0, or "
                              "client.adaptive_batch.optimizer = \"client\"")
        if self.settings.test != "none" and scenario.model.norm == "batch":
            raise ConfigError("model.norm", "adaptive_batch's tests need per-sample gradients, which BatchNorm "
                              "in training mode does not define", "use model.norm = \"group\" or \"none\"")

    # -- persistence: b per client across rounds ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"b": int(self.b)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.b = int(state.get("b", 0))

    def cap(self, state: TrainState) -> int:
        n = int(state.x.shape[0])
        return min(self.settings.b_max, n) if self.settings.b_max else n

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if event is Event.STEP:
            self._step(state)
            return
        if s.test == "none" and s.optimizer == "client":
            return
        if event is Event.ROUND_START:
            self.b = max(self.b or state.batch_size, 1)
            self.b = min(self.b, max(self.cap(state), 1))
            self._budget = state.planned_steps * state.batch_size
            self._acc = None
            self._tests = self._grew = 0
        elif event is Event.SAMPLER:
            self._order, self._taken, self._pos = state.order, 0, 0
            self._batches = self._split(self._order, self._budget - state.samples_seen)
            state.batches = self._batches
        elif event is Event.AFTER_BACKWARD and s.test != "none":
            self._test(state)
        elif event is Event.AFTER_STEP:
            self._taken += int(state.batch[1].shape[0])
            self._pos += 1
            seen = state.samples_seen + int(state.batch[1].shape[0])
            if seen >= self._budget:
                state.stop = True
            else:  # the rest of the epoch in batches of the (possibly grown) b; the loop picks them up
                self._batches[self._pos:] = self._split(self._order[self._taken:], self._budget - seen)
        elif event is Event.ROUND_END:
            state.metrics[f"{self.name}/batch_size"] = float(self.b)
            state.metrics[f"{self.name}/grew"] = float(self._grew)

    def _split(self, order: torch.Tensor, room: int) -> list[torch.Tensor]:
        """``order`` (at most ``room`` samples of it) in batches of the current ``b``."""
        order = order[:max(room, 0)]
        return [order[i:i + self.b] for i in range(0, int(order.shape[0]), self.b)]

    def _test(self, state: TrainState) -> None:
        x, y = state.batch
        m = min(int(y.shape[0]), self.settings.max_test_samples)
        if m < 2:
            return
        grads = per_sample_grads(state.model, x[:m], y[:m], state.loss_fn)
        s, cap = self.settings, self.cap(state)
        new = norm_test(grads, self.b, s.eta, cap) if s.test == "norm" else \
            inner_product_test(grads, self.b, s.theta, s.nu, cap)
        self._tests += 1
        if new > self.b:
            self._grew += 1
            self.b = new

    def _step(self, state: TrainState) -> None:
        s = self.settings
        if s.optimizer == "client":
            state.optimizer.step()
            return
        params = list(params_of(state.model).values())
        lr = float(state.optimizer.param_groups[0]["lr"])
        if s.optimizer == "adagrad_norm":
            if self._acc is None:
                self._acc = torch.tensor(s.initial_accumulator, dtype=torch.float64)
            adagrad_norm_step(params, self._acc, lr)
        else:
            if self._acc is None:
                self._acc = [torch.full_like(p, s.initial_accumulator) for p in params]
            adagrad_step(params, self._acc, lr)
