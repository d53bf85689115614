"""Gradient plumbing shared by the strategies that exchange gradients instead of models
(``signsgd``/``mediansgd`` in :mod:`fedsim.strategies.signsgd`, ``coded_gd`` in
:mod:`fedsim.strategies.coded`).

* :class:`ParamLayout` maps the flat gradient vector to the model's state dict and back;
* :func:`flat_gradient` computes that vector for one batch;
* :func:`check_gradient_model` rejects models whose gradient is not a deterministic function of
  the data (BatchNorm statistics, dropout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.config import Scenario
from fedsim.data.federation import federation_of
from fedsim.errors import ConfigError
from fedsim.models import build_model
from fedsim.rng import derive_seed

__all__ = ["ParamLayout", "check_gradient_model", "flat_gradient"]


@dataclass(frozen=True)
class ParamLayout:
    """Where the flat gradient vector's coordinates live in the model's state dict.

    The vector covers the trainable parameters in ``named_parameters`` order; buffers (integer or
    float) are not part of it and are never changed by a gradient step.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ParamLayout":
        params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in params), tuple(s for _, s in params))

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> "ParamLayout":
        """The layout of the model the scenario builds (the same on the server and every client)."""
        fed = federation_of(scenario)
        return cls.from_model(build_model(scenario.model, tuple(fed.input_shape), int(fed.num_classes),
                                          derive_seed(scenario.run.seed, "model-init")))

    def positions(self, keys: list[str]) -> list[int]:
        """Index of every parameter in the state-dict ``keys``."""
        missing = [n for n in self.names if n not in keys]
        if missing:
            raise ConfigError("model", f"parameters {missing[:3]} are not in the global model's state dict",
                              "client and server must build the same model")
        return [keys.index(n) for n in self.names]

    def gather(self, keys: list[str], arrays: list[np.ndarray]) -> np.ndarray:
        """The flat float64 parameter vector of a state dict given as ``keys``/``arrays``."""
        return np.concatenate([np.asarray(arrays[i], dtype=np.float64).reshape(-1) for i in self.positions(keys)])

    def scatter(self, keys: list[str], arrays: list[np.ndarray], flat: np.ndarray) -> list[np.ndarray]:
        """A copy of ``arrays`` whose parameters are replaced by ``flat`` (each in its own dtype)."""
        flat = np.asarray(flat).reshape(-1)
        if flat.size != self.dim:
            raise ValueError(f"flat vector has {flat.size} coordinates, the model {self.dim}")
        out = list(arrays)
        start = 0
        for i, size, shape in zip(self.positions(keys), self.sizes, self.shapes):
            out[i] = flat[start:start + size].reshape(shape).astype(np.asarray(arrays[i]).dtype)
            start += size
        return out


def check_gradient_model(scenario: Scenario, strategy: str) -> None:
    """Gradient strategies need a model whose gradient is a deterministic function of the data."""
    m = scenario.model
    if m.norm == "batch":
        raise ConfigError("model.norm", f"'{strategy}' exchanges gradients, which cannot carry BatchNorm "
                          "running statistics", "use model.norm = \"group\" or \"none\"")
    if m.dropout > 0:
        raise ConfigError("model.dropout", f"'{strategy}' needs deterministic gradients; dropout would draw "
                          "from an unseeded generator", "set model.dropout = 0")


def flat_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, float]:
    """Gradient of the cross-entropy (``reduction`` ``"mean"`` or ``"sum"``) at the model's current
    weights, flattened over the trainable parameters in ``named_parameters`` order; and the loss."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    loss = torch.nn.functional.cross_entropy(model(x), y, reduction=reduction)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    return flat.detach(), float(loss.detach())
