"""Data Diet: score every local example by EL2N or GraNd once, then train on the hardest fraction only.

Reference
---------
Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in Training",
NeurIPS 2021 (arXiv 2107.07075). Spec: ``client-plugins.md`` §B.5.

Scores of an example ``(x, y)`` at weights ``w`` (``p = softmax(f(w, x))``, ``e_y`` the one-hot label):

* EL2N ``= ‖p − e_y‖₂`` (a forward pass; it lies in ``[0, √2]``), the norm of the cross-entropy's gradient
  in the logits — the same number PA&DA samples by (:mod:`fedsim.clients.plugins.grad_norm_sampling`
  calls :func:`el2n` too);
* GraNd ``= ‖∇_w ℓ(f(w, x), y)‖₂`` (per-example gradients, :func:`fedsim.clients.functional.per_sample_grads`).
  For a linear softmax layer with bias, ``GraNd² = EL2N² · (‖x‖² + 1)``.

The paper averages the scores over K independent runs; on a federated client the global models of
successive rounds stand in for them: the plugin scores its data with the received global model at the
start of each of the first ``rounds`` rounds once the run's progress has reached ``start`` (the model in
``eval`` mode, so BatchNorm uses its running statistics and dropout is off), averages, and from then on
keeps only ``⌊keep·n⌋`` examples: the highest-scoring ones after skipping the ``⌊offset·n⌋`` very
hardest (likely mislabelled). It owns the sampler: each epoch's random order is restricted to the kept
examples, so an epoch has fewer steps. ``keep = 1, offset = 0`` is neutral (the plain run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsim.clients.functional import per_sample_grads
from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin

__all__ = ["DataDiet", "el2n", "grand", "keep_indices", "score_examples"]


def el2n(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example ``‖softmax(logits) − onehot(y)‖₂`` (shape ``[B]``), the cross-entropy's logit-gradient norm."""
    p = torch.softmax(logits.detach(), dim=1)
    return (p - nn.functional.one_hot(y, p.shape[1]).to(p.dtype)).norm(dim=1)


def grand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example norm of the cross-entropy's gradient in all trainable parameters (shape ``[B]``)."""
    grads = per_sample_grads(model, x, y)
    return torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))


@torch.no_grad()
def _el2n_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([el2n(model(x[s:s + batch_size]), y[s:s + batch_size])
                      for s in range(0, int(x.shape[0]), batch_size)])


def score_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str = "el2n",
                   batch_size: int = 512) -> torch.Tensor:
    """EL2N or GraNd of every example, the model evaluated in ``eval`` mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        if kind == "el2n":
            return _el2n_pass(model, x, y, batch_size)
        return torch.cat([grand(model, x[s:s + batch_size], y[s:s + batch_size])
                          for s in range(0, int(x.shape[0]), batch_size)])
    finally:
        model.train(was_training)


def keep_indices(scores: torch.Tensor | np.ndarray, keep: float, offset: float = 0.0) -> torch.Tensor:
    """Positions of the kept examples: rank by score (highest first, ties by position), skip the
    ``⌊offset·n⌋`` hardest, keep the next ``max(1, ⌊keep·n⌋)``; returned in ascending position order."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    n = int(s.shape[0])
    ranking = torch.from_numpy(np.argsort(-s.numpy(), kind="stable"))
    n_off = int(math.floor(offset * n + 1e-9))
    n_keep = min(max(1, int(math.floor(keep * n + 1e-9))), n - n_off)
    return ranking[n_off:n_off + n_keep].sort().values


@register_plugin
class DataDiet(ClientPlugin):
    """Prune the local data to the highest EL2N / GraNd scores (Paul et al., NeurIPS 2021)."""

    name = "data_diet"
    events = frozenset({Event.ROUND_START, Event.SAMPLER, Event.ROUND_END})
    owns = frozenset({"sampler"})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["data_diet"]', "client.data_diet.keep=0.5", "client.data_diet.start=0.1")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        #: fraction of the local data kept (1 = no pruning)
        keep: float = 0.5
        #: fraction of the very hardest examples skipped before keeping (noisy labels)
        offset: float = 0.0
        #: "el2n" (a forward pass) or "grand" (per-example gradients)
        score: str = "el2n"
        #: run progress (0..1) from which scoring starts; pruning starts once ``rounds`` scorings are averaged
        start: float = 0.1
        #: how many successive rounds' global models are averaged into the scores (the paper's K runs)
        rounds: int = 1

        def __post_init__(self) -> None:
            if not 0.0 < self.keep <= 1.0:
                raise ValueError(f"keep must be in (0, 1], got {self.keep}")
            if not 0.0 <= self.offset < 1.0 or self.keep + self.offset > 1.0 + 1e-12:
                raise ValueError(f"offset must be in [0, 1) with keep + offset <= 1, got offset={self.offset}, "
                                 f"keep={self.keep}")
            if self.score not in ("el2n", "grand"):
                raise ValueError(f"score must be 'el2n' or 'grand', got '{self.score}'")
            if not 0.0 <= self.start <= 1.0:
                raise ValueError(f"start must be a run progress in [0, 1], got {self.start}")
            if self.rounds < 1:
                raise ValueError(f"rounds must be >= 1, got {self.rounds}")

        @classmethod
        def neutral(cls) -> "DataDiet.Settings":
            return cls(keep=1.0, offset=0.0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._sum: np.ndarray | None = None  # summed scores over the scorings so far
        self._count = 0
        self._kept: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.settings.keep < 1.0 or self.settings.offset > 0.0

    def on(self, event: Event, state: TrainState) -> None:
        if not self.active:
            return
        s = self.settings
        if event is Event.ROUND_START:
            n = int(state.x.shape[0])
            if self._sum is not None and self._sum.shape[0] != n:
                self._sum, self._count = None, 0  # the client's data changed: score afresh
            if self._count < s.rounds and state.progress >= s.start:
                scores = score_examples(state.model, state.x, state.y, s.score).double().cpu().numpy()
                self._sum = scores if self._sum is None else self._sum + scores
                self._count += 1
            self._kept = None
            if self._count >= s.rounds:
                self._kept = keep_indices(self._sum / self._count, s.keep, s.offset).to(state.device)
        elif event is Event.SAMPLER and self._kept is not None:
            mask = torch.zeros(int(state.x.shape[0]), dtype=torch.bool, device=state.device)
            mask[self._kept] = True
            state.order = state.order[mask[state.order]]
        elif event is Event.ROUND_END:
            state.metrics["data_diet/kept"] = float(self._kept.numel() if self._kept is not None else state.x.shape[0])

    def state_dict(self) -> dict:
        if self._sum is None:
            return {}
        return {"score_sum": self._sum, "scorings": np.asarray([self._count], dtype=np.int64)}

    def load_state_dict(self, state: dict) -> None:
        if "score_sum" in state:
            self._sum = np.asarray(state["score_sum"], dtype=np.float64)
            self._count = int(np.asarray(state["scorings"]).reshape(-1)[0])
