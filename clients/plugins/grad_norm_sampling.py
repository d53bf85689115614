"""PA&DA's data half: sample local examples in proportion to their gradient-norm proxy.

Reference
---------
Lu et al., "PA&DA: Jointly Sampling PAth and DAta for Consistent NAS", CVPR 2023 (arXiv 2302.14772);
official code ShunLu91/PA-DA (``train_panda_201.py``). Spec: ``client-plugins.md`` §B.21.

During an epoch the plugin records each example's proxy ``q_i = ‖softmax(z_i) − onehot(y_i)‖₂``, the norm
of the loss gradient in the logits (EL2N at the current weights, :func:`fedsim.clients.plugins.data_diet.el2n`),
from the training forward pass itself (no extra pass); an example seen twice gets the mean, an unseen one 0.
The next epoch draws ``n`` indices with replacement from ``p_i = τ·q_i/Σq + (1 − τ)/n``, where ``τ`` ramps
linearly from 0 to ``tau`` as the federated run's progress goes from 0 to ``ramp_end`` (PA&DA's ``τ_e = e/E``
over the whole run, never restarting each round). The record persists per client across rounds.

``reweight = False`` (default, as the official code) trains on the drawn examples as they are. With
``reweight = True`` each drawn example's cross-entropy is weighted by ``1/(n p_i)`` (importance
sampling: the expected weighted mean gradient equals the full-data mean gradient); the plugin replaces
``state.loss_fn`` by that weighted loss for the round, so the ``"ce"`` term (and ``train_loss``) is the
weighted one. While ``τ = 0`` (and before anything is recorded) the loop's own uniform order is kept,
so ``tau = 0`` is the neutral setting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.plugins.data_diet import el2n
from fedsim.clients.schedules import linear

__all__ = ["GradNormSampling", "importance_weights", "sampling_probabilities", "weighted_cross_entropy"]


def sampling_probabilities(q: torch.Tensor, tau: float) -> torch.Tensor:
    """``p = τ·q/Σq + (1 − τ)/n`` (uniform when ``Σq = 0``); sums to 1 and ``p_i ≥ (1 − τ)/n``."""
    q = q.to(torch.float64)
    n = int(q.shape[0])
    total = float(q.sum())
    share = q / total if total > 0 else torch.full_like(q, 1.0 / n)
    return tau * share + (1.0 - tau) / n


def importance_weights(p: torch.Tensor) -> torch.Tensor:
    """``1 / (n p_i)``: the weights that make a mean over examples drawn from ``p`` unbiased."""
    return 1.0 / (p.shape[0] * p)


def weighted_cross_entropy(weights: Callable[[], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A loss function ``(outputs, target) -> mean_i w_i · CE_i`` with ``w = weights()`` for the current batch."""
    def loss(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = weights()
        per = nn.functional.cross_entropy(outputs, target, reduction="none")
        if w.shape != per.shape:
            raise RuntimeError(f"grad_norm_sampling: {tuple(w.shape)} weights for a batch of {tuple(per.shape)} "
                               "losses (a plugin changed the batch size after sampling)")
        return (w.to(per.dtype) * per).mean()
    return loss


@register_plugin
class GradNormSampling(ClientPlugin):
    """Sample ∝ the per-example gradient-norm proxy, mixed with uniform by a ramp (PA&DA, CVPR 2023)."""

    name = "grad_norm_sampling"
    events = frozenset({Event.ROUND_START, Event.EPOCH_START, Event.SAMPLER, Event.BATCH, Event.AFTER_FORWARD,
                        Event.EPOCH_END, Event.ROUND_END})
    owns = frozenset({"sampler"})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["grad_norm_sampling"]', "client.grad_norm_sampling.tau=1.0")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        #: final mixing weight of the proxy distribution (0 = uniform: the plain run)
        tau: float = 1.0
        #: run progress at which the ramp 0 → tau ends
        ramp_end: float = 1.0
        #: weight each drawn example's loss by 1/(n p_i) (unbiased; the official code does not)
        reweight: bool = False

        def __post_init__(self) -> None:
            if not 0.0 <= self.tau <= 1.0:
                raise ValueError(f"tau must be in [0, 1], got {self.tau}")
            if not 0.0 < self.ramp_end <= 1.0:
                raise ValueError(f"ramp_end must be a run progress in (0, 1], got {self.ramp_end}")

        @classmethod
        def neutral(cls) -> "GradNormSampling.Settings":
            return cls(tau=0.0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._q: torch.Tensor | None = None  # proxy of the last completed epoch
        self._sum: torch.Tensor | None = None
        self._cnt: torch.Tensor | None = None
        self._p: torch.Tensor | None = None  # the distribution of the current epoch (None: loop's own order)
        self._w: torch.Tensor | None = None
        self._base_loss = None

    def tau_at(self, progress: float) -> float:
        return linear(progress, 0.0, self.settings.tau, 0.0, self.settings.ramp_end)

    def on(self, event: Event, state: TrainState) -> None:
        if self.settings.tau == 0.0:
            return
        n = int(state.x.shape[0])
        if event is Event.ROUND_START:
            if self._q is not None and self._q.shape[0] != n:
                self._q = None
            if self.settings.reweight:
                self._base_loss = state.loss_fn
                state.loss_fn = weighted_cross_entropy(lambda: self._w)
        elif event is Event.EPOCH_START:
            self._sum = torch.zeros(n, dtype=torch.float64)
            self._cnt = torch.zeros(n, dtype=torch.float64)
        elif event is Event.SAMPLER:
            tau = self.tau_at(state.progress)
            self._p = None
            if self._q is not None and tau > 0.0:
                self._p = sampling_probabilities(self._q, tau)
                state.order = torch.multinomial(self._p, n, replacement=True, generator=state.rng).to(state.device)
        elif event is Event.BATCH:
            idx = state.batch_indices.cpu()
            self._w = (importance_weights(self._p)[idx] if self._p is not None
                       else torch.ones(idx.shape[0], dtype=torch.float64)).to(state.device)
        elif event is Event.AFTER_FORWARD:
            _, by = state.batch
            idx = state.batch_indices.cpu()
            if state.outputs is not None and state.outputs.shape[0] == idx.shape[0] == by.shape[0]:
                self._sum.index_add_(0, idx, el2n(state.outputs, by).double().cpu())
                self._cnt.index_add_(0, idx, torch.ones(idx.shape[0], dtype=torch.float64))
        elif event is Event.EPOCH_END:
            if self._cnt is not None and float(self._cnt.sum()) > 0:
                self._q = torch.where(self._cnt > 0, self._sum / self._cnt.clamp(min=1), torch.zeros_like(self._sum))
        elif event is Event.ROUND_END:
            if self._base_loss is not None:
                state.loss_fn, self._base_loss = self._base_loss, None
            state.metrics["grad_norm_sampling/tau"] = self.tau_at(state.progress)

    def state_dict(self) -> dict:
        return {} if self._q is None else {"proxy": self._q.numpy()}

    def load_state_dict(self, state: dict) -> None:
        if "proxy" in state:
            self._q = torch.as_tensor(np.asarray(state["proxy"], dtype=np.float64))
