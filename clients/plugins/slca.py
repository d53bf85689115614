"""SLCA: a slow-learning backbone and classifier alignment from per-class feature statistics.

Reference
---------
Zhang, Wang, Kang, Chen, Wei, "SLCA: Slow Learner with Classifier Alignment for Continual Learning on
a Pre-trained Model", ICCV 2023 (arXiv 2303.05118); official code GengDavid/SLCA (``models/slca.py``).
Spec: ``client-plugins.md`` §B.17.

* **Slow learner.** The backbone learns with the head's learning rate times ``lr_ratio`` (the paper:
  1/100, 0.01 → 1e-4): at ``ROUND_START`` the optimizer's parameter groups are split into backbone and
  head (the model's last ``nn.Linear``); ``ROUND_END`` restores the original groups.
* **Classifier alignment (CA).** At ``ROUND_END`` the client stores, per class present in its data,
  the mean ``mu_c`` and covariance ``Sigma_c`` of the penultimate features of the trained model; for
  ``ca_epochs`` epochs it draws ``ca_samples`` features per class from ``N(mu_c, Sigma_c)`` and trains
  only the classifier (SGD, ``ca_lr``, cosine-decayed) on the cross-entropy of *normalised* logits:
  ``z / ||z||_2 / tau`` (one task: the reference divides by the mean over tasks of each task's logit
  norm). The backbone is never touched by CA.

In federated learning the statistics stay on the client (sharing them would leak data summaries).
``lr_ratio = 1`` and ``ca_epochs = 0`` is neutral.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.plugins.penultimate import classifier_of, features_and_logits
from fedsim.rng import torch_generator

#: mini-batch size of classifier alignment (the reference trains CA on batches of 128 sampled features)
CA_BATCH = 128

__all__ = ["SLCA", "class_statistics", "normalized_logits", "sample_features", "slow_learner_groups"]


def slow_learner_groups(optimizer: torch.optim.Optimizer, head_params: list[torch.Tensor],
                        lr_ratio: float) -> list[dict]:
    """Split every parameter group into backbone (lr x ``lr_ratio``) and head (lr unchanged) groups.

    Returns the original groups (to restore with ``optimizer.param_groups = saved``).
    """
    saved = optimizer.param_groups
    head_ids = {id(p) for p in head_params}
    groups = []
    for g in saved:
        backbone = [p for p in g["params"] if id(p) not in head_ids]
        head = [p for p in g["params"] if id(p) in head_ids]
        if backbone:
            groups.append({**g, "params": backbone, "lr": g["lr"] * lr_ratio})
        if head:
            groups.append({**g, "params": head})
    optimizer.param_groups = groups
    return saved


def normalized_logits(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """SLCA's logit normalisation for one task: ``z / ||z||_2 / tau`` per sample (scale-invariant; the norm
    is only floored at 1e-12 for an all-zero row, so no additive epsilon breaks the invariance)."""
    return logits / logits.norm(dim=1, keepdim=True).clamp_min(1e-12) / tau


def class_statistics(features: torch.Tensor, labels: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per class present: ``(mean, covariance)`` of the features (float64; unbiased covariance, or zero
    for a class with one sample)."""
    out = {}
    f = features.detach().double()
    for c in torch.unique(labels).tolist():
        fc = f[labels == c]
        mean = fc.mean(0)
        cov = torch.cov(fc.T, correction=1).reshape(f.shape[1], f.shape[1]) if fc.shape[0] > 1 \
            else torch.zeros(f.shape[1], f.shape[1], dtype=f.dtype, device=f.device)
        out[int(c)] = (mean, cov)
    return out


def sample_features(mean: torch.Tensor, cov: torch.Tensor, n: int, gen: torch.Generator,
                    jitter: float = 1e-4) -> torch.Tensor:
    """``n`` draws from ``N(mean, cov + jitter I)`` (Cholesky of the regularised covariance), float64."""
    d = mean.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=mean.device)
    chol = torch.linalg.cholesky(cov.double() + jitter * eye)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64, device=gen.device).to(mean.device)
    return mean.double() + z @ chol.T


@register_plugin
class SLCA(ClientPlugin):
    """Slow backbone learning rate during the round, classifier alignment at its end."""

    name = "slca"
    events = frozenset({Event.ROUND_START, Event.ROUND_END})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["slca"]', "client.slca.lr_ratio=0.1", "client.slca.ca_epochs=5")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        lr_ratio: float = 0.01  # backbone lr / head lr
        ca_epochs: int = 5      # classifier-alignment epochs at the end of the round (0 = off)
        ca_samples: int = 256   # sampled features per class per epoch
        ca_lr: float = 0.01
        tau: float = 0.1        # logit-normalisation temperature

        def __post_init__(self) -> None:
            if not 0 < self.lr_ratio <= 1:
                raise ValueError(f"lr_ratio must lie in (0, 1], got {self.lr_ratio}")
            if self.ca_epochs < 0 or self.ca_samples < 1 or self.ca_lr <= 0 or self.tau <= 0:
                raise ValueError("need ca_epochs >= 0, ca_samples >= 1, ca_lr > 0 and tau > 0")

        @classmethod
        def neutral(cls) -> "SLCA.Settings":
            return cls(lr_ratio=1.0, ca_epochs=0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._saved_groups: list[dict] | None = None

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if event is Event.ROUND_START:
            if s.lr_ratio != 1.0:
                _, head = classifier_of(state.model)
                self._saved_groups = slow_learner_groups(state.optimizer, list(head.parameters()), s.lr_ratio)
            return
        if self._saved_groups is not None:
            state.optimizer.param_groups = self._saved_groups
            self._saved_groups = None
        if s.ca_epochs:
            state.metrics["slca/ca_loss"] = self.align(state)

    def align(self, state: TrainState) -> float:
        """Classifier alignment on features sampled from this round's per-class statistics."""
        s, model = self.settings, state.model
        was = model.training
        model.eval()
        with torch.no_grad():
            feats = torch.cat([features_and_logits(model, state.x[i:i + 1024])[0]
                               for i in range(0, int(state.x.shape[0]), 1024)])
        model.train(was)
        stats = class_statistics(feats, state.y)
        _, head = classifier_of(model)
        gen = torch_generator(state.seed, "slca", state.round, state.client_id)
        opt = torch.optim.SGD(head.parameters(), lr=s.ca_lr, momentum=0.9)
        loss = torch.zeros(())
        for epoch in range(s.ca_epochs):
            for g in opt.param_groups:  # cosine schedule over the CA epochs
                g["lr"] = 0.5 * s.ca_lr * (1 + math.cos(math.pi * epoch / s.ca_epochs))
            xs = torch.cat([sample_features(m, c, s.ca_samples, gen) for m, c in stats.values()])
            ys = torch.cat([torch.full((s.ca_samples,), k, dtype=torch.long) for k in stats]).to(xs.device)
            order = torch.randperm(int(ys.shape[0]), generator=gen).to(xs.device)
            xs, ys = xs[order].to(head.weight.dtype), ys[order]
            for b in range(0, int(ys.shape[0]), CA_BATCH):
                loss = F.cross_entropy(normalized_logits(head(xs[b:b + CA_BATCH]), s.tau), ys[b:b + CA_BATCH])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        head.zero_grad(set_to_none=True)
        return float(loss.detach())
