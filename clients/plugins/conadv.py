"""ConAdv: one-step adversarial examples computed from stale parameters, as a client plugin.

Reference
---------
Liu, Chen, Hsieh, You et al., "Concurrent Adversarial Learning for Large-Batch Training", ICLR 2022
(arXiv 2106.00221). Spec: ``client-plugins.md`` §B.1.

At local step ``t`` the perturbation uses the parameters of ``τ`` steps earlier:
``δ_t = ε · sign(∇_x ℓ(θ_{t−τ}; x_t, y_t))``, ``x̂_t = Π_{B_ε(x_t) ∩ [lo, hi]}(x_t + δ_t)``, and the step
uses ``g_t = ∇_θ ℓ(θ_t; x̂_t)`` (or the mix ``(1 − w)·ℓ(θ_t; x̂_t) + w·ℓ(θ_t; x_t)``, ``w = clean_weight``;
the paper's exact mixture is not in a public source we could read, so ``w = 0`` is the default). Because
``δ_t`` needs only ``θ_{t−τ}``, the input-gradient pass can run beside the weight-gradient pass on real
hardware; a simulator cannot show that wall-clock gain, only the effect of the staleness on training.

The stale parameters come from a ring buffer of :func:`fedsim.clients.functional.snapshot` copies taken
at ``BEFORE_STEP`` (``θ_t`` before its update) and are evaluated with
:func:`fedsim.clients.functional.call_with`, so the live model is never touched. Steps earlier than
``τ`` in a round use the oldest parameters available: the round's received global model (the buffer
restarts every round because the process's model is reloaded with the global weights). ``τ = 0`` is
ordinary one-step (FGSM, no random start) adversarial training on the current parameters.

The valid range ``[lo, hi]`` is the range of the client's data (or ``input_range``), as in
:mod:`fedsim.clients.plugins.adversarial`. ``epsilon = 0`` is neutral.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from fedsim.clients.functional import Params, call_with, snapshot
from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.plugins.adversarial import EvalMode, attack, data_range

__all__ = ["ConAdv", "stale_perturbation"]


def stale_perturbation(model: torch.nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor,
                       epsilon: float, lo: float, hi: float) -> torch.Tensor:
    """``x̂ = Π_{B_ε(x) ∩ [lo, hi]}(x + ε · sign(∇_x ℓ(params; x, y)))``, detached from every parameter.

    ``params`` (e.g. a snapshot of ``θ_{t−τ}``) is evaluated through ``functional_call``; the model's
    own parameters are used for any name ``params`` lacks (buffers).
    """
    return attack(lambda inp: call_with(model, params, inp), x, y, epsilon, 1, epsilon, lo, hi,
                  random_start=False)


@register_plugin
class ConAdv(ClientPlugin):
    """Adversarial training on one-step examples from ``τ``-step-old parameters; ``epsilon = 0`` is neutral."""

    name = "conadv"
    events = frozenset({Event.ROUND_START, Event.BATCH, Event.LOSS, Event.BEFORE_STEP, Event.ROUND_END})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["conadv"]', "client.conadv.epsilon=0.05", "client.conadv.staleness=1")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        epsilon: float = 0.05  # ℓ∞ radius on the data's scale
        staleness: int = 1  # τ: local steps between the parameters that make δ and those that train
        clean_weight: float = 0.0  # w in (1 − w)·ℓ(x̂) + w·ℓ(x)
        input_range: tuple[float, ...] = ()  # [lo, hi]; empty = min/max of the client's data

        def __post_init__(self) -> None:
            object.__setattr__(self, "input_range", tuple(float(v) for v in self.input_range))
            if self.epsilon < 0:
                raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
            if self.staleness < 0:
                raise ValueError(f"staleness must be >= 0, got {self.staleness}")
            if not 0 <= self.clean_weight <= 1:
                raise ValueError(f"clean_weight must be in [0, 1], got {self.clean_weight}")
            r = self.input_range
            if r and (len(r) != 2 or not r[0] < r[1]):
                raise ValueError(f"input_range must be empty or [lo, hi] with lo < hi, got {list(r)}")

        @classmethod
        def neutral(cls) -> "ConAdv.Settings":
            return cls(epsilon=0.0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._ring: deque[Params] = deque(maxlen=max(self.settings.staleness, 1))
        self._range = (0.0, 1.0)
        self._clean: tuple[torch.Tensor, torch.Tensor] | None = None

    def stale_params(self, model: torch.nn.Module) -> Params:
        """``θ_{t−τ}``: the oldest snapshot in the ring (``τ = 0``: a snapshot of the current parameters)."""
        if self.settings.staleness == 0 or not self._ring:
            return snapshot(model)
        return self._ring[0]

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if s.epsilon == 0:
            return
        if event is Event.ROUND_START:
            self._range = data_range(state.x, s.input_range)
            self._ring.clear()
            if s.staleness:
                self._ring.append(snapshot(state.model))  # θ_0: the received global model
        elif event is Event.BATCH:
            x, y = state.batch
            with EvalMode(state.model) as model:
                x_adv = stale_perturbation(model, self.stale_params(model), x, y, s.epsilon, *self._range)
            self._clean = (x, y) if s.clean_weight else None
            state.batch = (x_adv, y)
        elif event is Event.LOSS and self._clean is not None:
            x, y = self._clean
            clean = state.loss_fn(state.model(x), y)
            state.add_loss("conadv_clean", s.clean_weight * (clean - state.loss_terms["ce"]))
        elif event is Event.BEFORE_STEP and s.staleness:
            # θ_t, about to be updated (θ_0 is in the ring since ROUND_START); the ring keeps the last τ
            # of θ_0..θ_t, so at step t+1 its oldest is θ_{t+1−τ}, or θ_0 while t+1 < τ
            if state.step > 0:
                self._ring.append(snapshot(state.model))
        elif event is Event.ROUND_END:
            self._ring.clear()
            self._clean = None
