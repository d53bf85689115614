"""MixTraining's semi-supervised core: an EMA teacher, confident pseudo-labels, per-sample augmentation strength.

Reference
---------
Xu, Lin, Hu, Cao, Wei, Zhang, Hu, Bai, "Bootstrap Your Object Detector via Mixed Training", NeurIPS 2021
(arXiv 2111.03056). Spec: ``client-plugins.md`` §B.23 (core only: the detection machinery is not part of
it). The paper's EMA teacher ("bootstrapped" model) (a) decides per sample whether a strong augmentation
is still learnable, falling back to the weak one, and (b) adds its confident predictions as extra
targets. For classification clients:

* **Views.** The *weak* view is the batch as the loop gives it (the client's data, or the view an
  earlier plugin such as SemiFL's client step made); the *strong* view is a strong augmentation of the
  raw samples (images: pad-and-crop + RandAugment; feature vectors: Gaussian noise + feature drop).
  A sample trains on its strong view when the teacher's probability of its label on that view is at
  least ``threshold``, else on the weak one.
* **Pseudo-labels.** Where the teacher's confidence on the weak view reaches ``threshold``, the term
  ``weight * sum_{confident} CE(f(x), argmax p_teacher) / N`` is added (``"mixtrain"``).
* **Teacher.** ``theta_T <- ema * theta_T + (1 - ema) * theta`` after every local step, started from the
  received global model at each round (choice: the global model is the federation's own average, so a
  per-client teacher persisted across rounds would only be a staler copy of it, and clients sampled
  rarely would keep very old teachers). It runs in eval mode at a parameter snapshot (``call_with``).

``threshold = 1`` turns both parts off (softmax saturates at 1.0 in float32, so 1 is defined as "never"):
the batch stays as given — supervised training on the weak view — and ``weight = 0`` drops the
pseudo-label term; ``threshold = 1, weight = 0`` is the neutral setting. The paper's thresholds were not
confirmed from a stored source; 0.95 is FixMatch's. Randomness: ``torch_generator(seed, "mixtrain", round,
client)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsim.clients.functional import call_with, snapshot
from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.plugins.barlow_twins import random_view
from fedsim.rng import torch_generator

__all__ = ["MixTrain", "choose_views", "confident_pseudo_labels", "ema_update"]


@torch.no_grad()
def ema_update(teacher: Mapping[str, torch.Tensor], student: Mapping[str, torch.Tensor], momentum: float) -> None:
    """In place: ``teacher[k] = momentum * teacher[k] + (1 - momentum) * student[k]`` for every key."""
    for k, t in teacher.items():
        t.mul_(momentum).add_(student[k].detach(), alpha=1.0 - momentum)


def confident_pseudo_labels(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, labels)``: ``labels = argmax p``; ``mask = max p >= threshold`` (none when threshold >= 1)."""
    conf, labels = probs.max(dim=1)
    mask = conf >= threshold if threshold < 1 else torch.zeros_like(conf, dtype=torch.bool)
    return mask, labels


def choose_views(weak: torch.Tensor, strong: torch.Tensor, strong_probs: torch.Tensor, labels: torch.Tensor,
                 threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample the strong view where the teacher's probability of the label on it reaches
    ``threshold`` (still learnable), else the weak view; returns ``(views, use_strong)``."""
    p_label = strong_probs.gather(1, labels.reshape(-1, 1)).squeeze(1)
    use = p_label >= threshold if threshold < 1 else torch.zeros_like(p_label, dtype=torch.bool)
    shape = (-1,) + (1,) * (weak.ndim - 1)
    return torch.where(use.reshape(shape), strong, weak), use


@register_plugin
class MixTrain(ClientPlugin):
    """EMA teacher choosing weak/strong views per sample and adding confident pseudo-labels."""

    name = "mixtrain"
    events = frozenset({Event.ROUND_START, Event.BATCH, Event.LOSS, Event.AFTER_STEP, Event.ROUND_END})
    bench_scenario = "semifl_digits"
    bench_overrides = ('client.plugins=["mixtrain"]', "client.mixtrain.threshold=0.9")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        threshold: float = 0.95  # teacher confidence for the strong view and for pseudo-labels (1: off)
        weight: float = 1.0      # weight of the pseudo-label term (0: none)
        ema: float = 0.99        # teacher momentum per local step
        noise: float = 0.1       # feature vectors: Gaussian noise std of the strong view
        drop: float = 0.1        # feature vectors: probability of zeroing a feature in the strong view

        def __post_init__(self) -> None:
            if not 0 <= self.threshold <= 1:
                raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
            if self.weight < 0 or not 0 <= self.ema < 1:
                raise ValueError("need weight >= 0 and ema in [0, 1)")
            if self.noise < 0 or not 0 <= self.drop < 1:
                raise ValueError("need noise >= 0 and drop in [0, 1)")

        @classmethod
        def neutral(cls) -> "MixTrain.Settings":
            return cls(threshold=1.0, weight=0.0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.teacher: dict[str, torch.Tensor] = {}
        self._gen: torch.Generator | None = None
        self._pseudo: tuple[torch.Tensor, torch.Tensor] | None = None
        self._counts = {"strong": 0, "pseudo": 0, "seen": 0}

    def _teacher_probs(self, state: TrainState, x: torch.Tensor) -> torch.Tensor:
        was = state.model.training
        state.model.eval()
        with torch.no_grad():
            probs = F.softmax(call_with(state.model, self.teacher, x), dim=1)
        state.model.train(was)
        return probs

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if s.threshold >= 1:
            return  # off: supervised training on the batch as given
        if event is Event.ROUND_START:
            self.teacher = snapshot(state.model)
            self._gen = torch_generator(state.seed, self.name, state.round, state.client_id)
        elif event is Event.BATCH:
            weak, labels = state.batch
            raw = state.x[state.batch_indices]
            strong = random_view(raw, self._gen, s.noise, s.drop)
            views, use = choose_views(weak, strong, self._teacher_probs(state, strong), labels, s.threshold)
            self._pseudo = confident_pseudo_labels(self._teacher_probs(state, weak), s.threshold) \
                if s.weight else None
            state.batch = (views, labels)
            self._counts["strong"] += int(use.sum())
            self._counts["seen"] += int(labels.numel())
        elif event is Event.LOSS and self._pseudo is not None:
            mask, pseudo = self._pseudo
            self._counts["pseudo"] += int(mask.sum())
            if bool(mask.any()):
                ce = F.cross_entropy(state.outputs[mask], pseudo[mask], reduction="sum") / mask.numel()
                state.add_loss(self.name, s.weight * ce)
        elif event is Event.AFTER_STEP:
            ema_update(self.teacher, dict(state.model.named_parameters()), s.ema)
        elif event is Event.ROUND_END and self._counts["seen"]:
            state.metrics["mixtrain/strong_rate"] = self._counts["strong"] / self._counts["seen"]
            state.metrics["mixtrain/pseudo_rate"] = self._counts["pseudo"] / self._counts["seen"]
