"""Barlow Twins: redundancy reduction between the embeddings of two augmented views, as an auxiliary loss.

Reference
---------
Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
ICML 2021 (arXiv 2103.03230); official code facebookresearch/barlowtwins (``main.py``: embeddings
standardised by a ``BatchNorm1d(affine=False)``, ``c = bn(z1).T @ bn(z2) / N``, on-diagonal
``(c_ii - 1)^2`` plus ``lambd = 0.0051`` times the squared off-diagonal). Spec: ``client-plugins.md`` §B.13.

``L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2`` with ``C = z~A^T z~B / N`` and ``z~`` each
feature standardised over the batch. The plugin adds ``weight * L`` (term ``"barlow_twins"``) on two views
of the batch's raw samples (``state.x[batch_indices]``, whatever a previous plugin made of the batch):

* images ``(N, C, H, W)``: pad-and-crop, then RandAugment (``fedsim.clients.augment``);
* feature vectors: Gaussian noise (``noise``) and random feature drop (``drop``).

The embedding is the model's penultimate features or, with ``projector = D``, a per-client
``Linear-BN-ReLU-Linear`` head of width ``D`` on them (the paper's projector, narrower). The projector
is trained with the round's optimizer (an extra parameter group), persisted in the client's
``context.state`` and never sent to the server. On SemiFL's unlabelled clients the term joins SemiFL's
pseudo-label objective; on labelled clients it is an auxiliary term. ``weight = 0`` is neutral.
Randomness: ``torch_generator(seed, "barlow_twins", round, client)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedsim.clients.augment import strong_augment, weak_augment
from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.plugins.penultimate import classifier_of, features_and_logits
from fedsim.rng import torch_generator

__all__ = ["BarlowTwins", "barlow_twins_loss", "cross_correlation", "random_view", "standardize", "two_views"]


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each column of ``z`` (N x D) to zero mean and unit (biased) variance, as ``BatchNorm1d(affine=False)``."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """``C = standardize(z_a)^T standardize(z_b) / N`` (D x D); needs N >= 2."""
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(f"need two (N, D) embeddings of equal shape, got {tuple(z_a.shape)}, {tuple(z_b.shape)}")
    if z_a.shape[0] < 2:
        raise ValueError("Barlow Twins needs at least 2 samples per batch (per-feature standardisation)")
    return standardize(z_a).T @ standardize(z_b) / z_a.shape[0]


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, off_diagonal: float = 5e-3) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + off_diagonal * sum_{i != j} C_ij^2``."""
    c = cross_correlation(z_a, z_b)
    diag = torch.diagonal(c)
    on = ((1 - diag) ** 2).sum()
    off = (c ** 2).sum() - (diag ** 2).sum()
    return on + off_diagonal * off


def random_view(x: torch.Tensor, gen: torch.Generator, noise: float, drop: float) -> torch.Tensor:
    """One random view of a batch: images pad-and-crop + RandAugment; vectors noise + feature drop."""
    if x.ndim == 4:
        pad = max(1, int(x.shape[-1]) // 8)
        return strong_augment(weak_augment(x, gen, flip=False, padding=pad), gen, weak_first=False)
    keep = (torch.rand(x.shape, generator=gen, device=gen.device) >= drop).to(x.device, x.dtype)
    return x * keep + noise * torch.randn(x.shape, generator=gen, device=gen.device).to(x.device, x.dtype)


def two_views(x: torch.Tensor, gen: torch.Generator, noise: float, drop: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent :func:`random_view` s of a batch."""
    return random_view(x, gen, noise, drop), random_view(x, gen, noise, drop)


@register_plugin
class BarlowTwins(ClientPlugin):
    """Adds ``weight * barlow_twins_loss`` of two views of each batch."""

    name = "barlow_twins"
    events = frozenset({Event.ROUND_START, Event.LOSS, Event.ROUND_END})
    bench_scenario = "semifl_digits"
    bench_overrides = ('client.plugins=["barlow_twins"]', "client.barlow_twins.weight=0.05")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        weight: float = 0.05         # weight of the Barlow Twins term in the client loss
        off_diagonal: float = 5e-3   # lambda of the loss (paper: 0.0051)
        projector: int = 0           # width of a per-client projector head (0: penultimate features)
        noise: float = 0.1           # feature vectors: Gaussian noise std of a view
        drop: float = 0.1            # feature vectors: probability of zeroing a feature in a view

        def __post_init__(self) -> None:
            if self.weight < 0 or self.off_diagonal < 0:
                raise ValueError("weight and off_diagonal must be >= 0")
            if self.projector < 0 or self.noise < 0 or not 0 <= self.drop < 1:
                raise ValueError("need projector >= 0, noise >= 0 and drop in [0, 1)")

        @classmethod
        def neutral(cls) -> "BarlowTwins.Settings":
            return cls(weight=0.0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.projector: nn.Module | None = None
        self._saved: dict[str, torch.Tensor] = {}
        self._gen: torch.Generator | None = None
        self._sum, self._steps = 0.0, 0

    def _build_projector(self, state: TrainState) -> None:
        _, head = classifier_of(state.model)
        d, width = head.in_features, self.settings.projector
        lin = [nn.utils.skip_init(nn.Linear, d, width), nn.utils.skip_init(nn.Linear, width, width)]
        proj = nn.Sequential(lin[0], nn.BatchNorm1d(width), nn.ReLU(), lin[1])
        gen = torch_generator(state.seed, "barlow_twins-projector", 0, state.client_id)
        with torch.no_grad():  # PyTorch's default Linear range, drawn from the plugin's own generator
            for layer in lin:
                bound = 1.0 / layer.in_features ** 0.5
                for p in (layer.weight, layer.bias):
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            proj.load_state_dict({**proj.state_dict(), **self._saved})
        self.projector = proj.to(state.device)

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if not s.weight:
            return
        if event is Event.ROUND_START:
            self._gen = torch_generator(state.seed, self.name, state.round, state.client_id)
            if s.projector:
                self._build_projector(state)
                state.optimizer.add_param_group({"params": list(self.projector.parameters())})
            return
        if event is Event.ROUND_END:
            if self.projector is not None:
                params = {id(p) for p in self.projector.parameters()}
                state.optimizer.param_groups[:] = [g for g in state.optimizer.param_groups
                                                   if not any(id(p) in params for p in g["params"])]
                for p in self.projector.parameters():
                    state.optimizer.state.pop(p, None)
            if self._steps:
                state.metrics["barlow_twins/loss"] = self._sum / self._steps
            return
        raw = state.x[state.batch_indices]
        if raw.shape[0] < 2:
            return  # standardisation over the batch needs two samples
        view_a, view_b = two_views(raw, self._gen, s.noise, s.drop)
        z_a, _ = features_and_logits(state.model, view_a)
        z_b, _ = features_and_logits(state.model, view_b)
        if self.projector is not None:
            z_a, z_b = self.projector(z_a), self.projector(z_b)
        loss = barlow_twins_loss(z_a, z_b, s.off_diagonal)
        state.add_loss(self.name, s.weight * loss)
        self._sum += float(loss.detach())
        self._steps += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The projector's weights (per client, never aggregated)."""
        if self.projector is None:
            return dict(self._saved)
        return {k: v.detach().cpu().clone() for k, v in self.projector.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self._saved = {k: torch.as_tensor(v) for k, v in state.items()}
