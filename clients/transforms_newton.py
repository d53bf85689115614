"""Step-size rules that look at the loss: ``normalized_gd`` and ``gns_newton``.

* **Normalized LR+GD** — Tyurin, "From Logistic Regression to the Perceptron Algorithm: Exploring
  Gradient Descent with Large Step Sizes", 2024 (arXiv 2412.08424; spec ``client-plugins.md`` §B.11).
  On separable data, LR+GD with a step ``γ → ∞`` becomes the batch perceptron, and the loss stops being
  a useful progress signal; the normalized method divides the gradient by the loss,
  ``w ← w − γ ∇f(w) / f(w)`` (``γ = client.lr``; ``f`` the batch's mean loss). The direction is
  invariant to scaling the loss, and the effective step grows as the loss falls.
* **Gradient-normalized smoothness (GNS) regularised Newton** — Semenov, Jaggi, Doikov,
  "Gradient-Normalized Smoothness for Optimization with Approximate Hessians", 2025 (Algorithm 1;
  reference code ``epfml/grad-norm-smooth`` ``src/methods.py``, §B.19). With ``λ = ‖g‖ / (γ + ε)``,
  ``Δ = −(H + λ I)⁻¹ g`` (Cholesky). The trial is accepted when
  ``f(x) − f(x + Δ) ≥ ‖∇f(x + Δ)‖² / (8 λ)``, and then ``γ ← max(2γ, γ_min)``; otherwise ``γ ← γ / 2``
  and the step is solved again, at most ``max_tries`` times. ``H`` is the exact Hessian of the batch
  loss (dense, for small models) or its generalised Gauss-Newton matrix. ``γ`` persists across steps
  (and rounds, with the client's state), as in the reference loop.

  Two choices differ from the reference code, to keep the guarantee "the loss falls on every step
  taken": a failed Cholesky factorisation (``H + λI`` not positive definite, possible with the exact
  Hessian of a non-convex model) counts as a rejected trial (``γ`` halves, so ``λ`` grows) instead of
  ending the search, and when no trial is accepted within ``max_tries`` no step is taken and γ keeps
  its value from before the search (the reference takes the last trial anyway; near a minimum, in
  floating point, the test can fail for every trial only because ``f(x) − f(x + Δ)`` rounds to zero,
  and halving γ forty times would leave the next batches with almost no step). The batch loss is re-evaluated at trial points through the
  ``loss_at`` closure the ``step`` plugin passes; the step length is the method's own
  (``sets_step_size``), so ``client.lr`` does not scale it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad_and_value, hessian

from fedsim.clients.transforms import GradTransform, Params, State, register_transform
from fedsim.errors import ConfigError

__all__ = ["NormalizedGD", "GNSNewton", "normalized_direction", "gns_step"]


def normalized_direction(grads: Params, loss: torch.Tensor | float) -> Params:
    """``∇f / f`` (the loss floored at the smallest positive float so a zero loss gives a zero step)."""
    f = max(float(loss), torch.finfo(torch.float32).tiny)
    return {k: g / f for k, g in grads.items()}


@register_transform
class NormalizedGD(GradTransform):
    """Normalized LR+GD: the gradient divided by the batch loss (see the module docstring)."""

    name = "normalized_gd"

    def update(self, grads, state, params, **extra):
        if extra.get("loss") is None:
            raise RuntimeError("normalized_gd needs the batch loss (the step plugin passes it as `loss`)")
        return normalized_direction(grads, extra["loss"]), state


def _flat(tensors: Params, names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[k].reshape(-1) for k in names])


def _unflat(vec: torch.Tensor, like: Params, names: list[str]) -> Params:
    out, at = {}, 0
    for k in names:
        n = like[k].numel()
        out[k] = vec[at:at + n].reshape(like[k].shape).to(like[k].dtype)
        at += n
    return out


def gns_step(f, x: torch.Tensor, g: torch.Tensor, h: torch.Tensor, gamma: float, *, eps: float = 1e-8,
             gamma_min: float = 1e-9, max_tries: int = 40) -> tuple[torch.Tensor, float, bool, int]:
    """One step of Algorithm 1 on a flat vector: ``(Δ, new γ, accepted, trials)``.

    Parameters
    ----------
    f : ``x -> (f(x), ∇f(x))`` at a flat parameter vector
    x, g, h : the point, its gradient and the (approximate) Hessian there
    gamma : the current γ; ``λ = ‖g‖ / (γ + eps)``
    """
    f0 = float(f(x)[0])
    gnorm = float(torch.linalg.vector_norm(g.double()))
    if gnorm == 0.0:
        return torch.zeros_like(x), gamma, True, 0
    h64, g64, start = h.double(), g.double(), gamma
    eye = torch.eye(h64.shape[0], dtype=torch.float64, device=h64.device)
    for trial in range(1, max_tries + 1):
        lam = gnorm / (gamma + eps)
        chol, info = torch.linalg.cholesky_ex(h64 + lam * eye)
        if int(info) != 0:  # not positive definite: as a rejected trial, a larger λ next
            gamma /= 2
            continue
        delta = -torch.cholesky_solve(g64[:, None], chol)[:, 0]
        f_new, g_new = f(x + delta.to(x.dtype))
        if f0 - float(f_new) >= float(g_new.double().square().sum()) / (8 * lam):
            return delta.to(x.dtype), max(2 * gamma, gamma_min), True, trial
        gamma /= 2
    return torch.zeros_like(x), start, False, max_tries  # no step; γ as it was (see the module docstring)


@register_transform
class GNSNewton(GradTransform):
    """Regularised Newton with gradient-normalised smoothness (Algorithm 1); see the module docstring."""

    name = "gns_newton"
    sets_step_size = True
    needs_closure = True

    @dataclass(frozen=True)
    class Settings:
        gamma0: float = 1.0
        gamma_min: float = 1e-9
        eps: float = 1e-8
        max_tries: int = 40
        hessian: str = "exact"  # exact | ggn
        max_params: int = 4096

        def __post_init__(self) -> None:
            if not (self.gamma0 > 0 and self.gamma_min > 0 and self.eps > 0):
                raise ValueError(f"gamma0, gamma_min and eps must be > 0, got {self.gamma0}, {self.gamma_min}, "
                                 f"{self.eps}")
            if self.max_tries < 1:
                raise ValueError(f"max_tries must be >= 1, got {self.max_tries}")
            if self.hessian not in ("exact", "ggn"):
                raise ValueError(f"hessian must be exact or ggn, got {self.hessian!r}")
            if not 1 <= self.max_params <= 16384:
                raise ValueError(f"max_params must be in [1, 16384] (a dense n x n Hessian), got {self.max_params}")

    def init(self, params: Params) -> State:
        return {"gamma": torch.tensor(float(self.settings.gamma0), dtype=torch.float64),
                "accepted": torch.zeros((), dtype=torch.int64), "rejected": torch.zeros((), dtype=torch.int64),
                "trials": torch.zeros((), dtype=torch.int64)}

    def update(self, grads: Params, state: State, params: Params, **extra: Any) -> tuple[Params, State]:
        s, loss_at = self.settings, extra.get("loss_at")
        if loss_at is None:
            raise RuntimeError("gns_newton needs the loss closure `loss_at` (the step plugin passes it)")
        names = list(grads)
        size = sum(int(grads[k].numel()) for k in names)
        if size > s.max_params:
            raise ConfigError("client.step.transforms", f"gns_newton builds a dense {size} x {size} Hessian, above "
                              f"max_params = {s.max_params}", "use a smaller model (e.g. model.name = \"logreg\") "
                              "or raise max_params in the gns_newton table")
        fixed = {k: v.detach() for k, v in params.items() if k not in grads}
        like = {k: params[k].detach() for k in names}

        def f_flat(vec: torch.Tensor) -> torch.Tensor:
            return loss_at({**fixed, **_unflat(vec, like, names)})

        x = _flat(like, names)
        g = _flat({k: v.detach() for k, v in grads.items()}, names)
        if s.hessian == "exact":
            h = hessian(f_flat)(x)
        else:
            ggn_at = extra.get("ggn_at")
            if ggn_at is None:
                raise RuntimeError("gns_newton with hessian = \"ggn\" needs `ggn_at` (the step plugin passes it)")
            h = ggn_at({**fixed, **like}, names)
        delta, gamma, ok, trials = gns_step(grad_and_value_swapped(f_flat), x, g, h, float(state["gamma"]),
                                            eps=s.eps, gamma_min=s.gamma_min, max_tries=s.max_tries)
        new = {"gamma": torch.tensor(gamma, dtype=torch.float64),
               "accepted": state["accepted"] + int(ok), "rejected": state["rejected"] + int(not ok),
               "trials": state["trials"] + trials}
        return {k: -v for k, v in _unflat(delta, like, names).items()}, new

    def metrics(self, state: State) -> dict[str, float]:
        return {"gamma": float(state["gamma"]), "accepted": float(state["accepted"]),
                "rejected": float(state["rejected"]), "trials": float(state["trials"])}

    def preflight(self, scenario: Any, key: str) -> None:
        m = scenario.model
        if getattr(m, "norm", "none") == "batch" or getattr(m, "dropout", 0.0):
            raise ConfigError(key, "gns_newton re-evaluates the batch loss at trial points, which must be a "
                              "deterministic function of the parameters: BatchNorm (batch statistics, running "
                              "averages) and dropout are not", "use model.norm = \"none\" or \"group\" and "
                              "model.dropout = 0")


def grad_and_value_swapped(f):
    """``x -> (f(x), ∇f(x))`` (``torch.func.grad_and_value`` gives them the other way round)."""
    gv = grad_and_value(f)

    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, v = gv(x)
        return v.detach(), g.detach()

    return both


def dense_ggn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, params: Params,
              names: list[str]) -> torch.Tensor:
    """The generalised Gauss-Newton matrix ``Jᵀ H_L J`` of the batch loss in the ``names`` parameters,
    dense (``n × n``), one GGN-vector product per unit vector (batched with ``vmap``)."""
    from torch.func import vmap

    from fedsim.clients.functional import ggn_vp

    like = {k: params[k] for k in names}
    n = sum(int(v.numel()) for v in like.values())
    eye = torch.eye(n, dtype=next(iter(like.values())).dtype, device=next(iter(like.values())).device)

    def column(e: torch.Tensor) -> torch.Tensor:
        out = ggn_vp(model, x, y, params, {**{k: torch.zeros_like(v) for k, v in params.items()},
                                           **_unflat(e, like, names)}, loss_fn)
        return _flat(out, names)

    return vmap(column)(eye)
