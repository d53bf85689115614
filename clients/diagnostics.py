"""Pure math of the diagnostic probes (``cockpit``, ``grad_spectrum``, ``hessian_top`` plugins).

Every function takes tensors or a loss as a function of a parameter dict (see
:mod:`fedsim.clients.functional`) and changes nothing; the plugins only pick the probe batch and
write metrics.

References
----------
* Schneider, Dangel, Hennig, "Cockpit: A Practical Debugging Tool for the Training of Deep Neural
  Networks", NeurIPS 2021 (α, GSNR, TIC, Hessian trace; the definitions follow the quantities of the
  reference code, ``cockpit/quantities/{alpha,mean_gsnr,tic,hess_trace}.py``).
* Liu et al., "Understanding Why Neural Networks Generalize Well Through GSNR of Parameters", ICLR 2020.
* Thomas et al., "On the interplay between noise and curvature and its effect on optimization and
  generalization", AISTATS 2020 (TIC).
* Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1990.
* Li et al., "How Instruction and Reasoning Data shape Post-Training: Data Quality through the Lens
  of Layer-wise Gradients", 2025 (nuclear norm, effective rank).
* Sagun et al., "Empirical Analysis of the Hessian of Over-Parametrized Neural Networks", 2017.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp

from fedsim.clients.functional import Params, flat
from fedsim.rng import torch_generator

__all__ = ["alpha_from_fit", "effective_rank", "fit_quadratic", "gsnr", "hessian_top_eigenvalues",
           "hutchinson_trace", "hvp_operator", "individual_losses_fn", "is_due", "probe_indices", "spectrum_stats",
           "step_alpha", "tic_trace", "unflat"]


def is_due(every: int, round: int) -> bool:
    """Whether a probe with period ``every`` fires in ``round`` (1-based): rounds 1, 1+k, 1+2k, …"""
    return (int(round) - 1) % int(every) == 0


def probe_indices(n: int, size: int, seed: int, client_id: int) -> torch.Tensor:
    """The client's fixed probe batch: the same ``min(size, n)`` positions every round (shared by all probes),
    drawn from the root seed and the client id only, so values compare across rounds."""
    gen = torch_generator(seed, "probe-batch", client_id)
    return torch.randperm(n, generator=gen)[:min(size, n)]


def individual_losses_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[Params], torch.Tensor]:
    """``params -> [B]`` per-example cross-entropy of ``model`` on ``(x, y)`` (buffers fixed)."""
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    return lambda p: nn.functional.cross_entropy(functional_call(model, (p, buffers), (x,)), y, reduction="none")


def unflat(vector: torch.Tensor, like: Params) -> Params:
    """Split a flat vector into tensors shaped like ``like`` (the inverse of :func:`flat`)."""
    out, start = {}, 0
    for k, t in like.items():
        out[k] = vector[start:start + t.numel()].reshape(t.shape).to(t.dtype)
        start += t.numel()
    return out


# -- gradient noise: GSNR and TIC from per-example gradients -----------------------------------
def gsnr(per_sample: torch.Tensor, eps: float = 1e-5) -> float:
    """Mean gradient signal-to-noise ratio over parameters (Cockpit ``MeanGSNR``).

    ``per_sample`` is ``[B, D]`` (one flattened gradient per example). Per coordinate
    ``GSNR_j = ḡ_j² / (mean_i g_ij² − ḡ_j² + eps)`` (the denominator is the population variance of
    the per-example gradients), averaged over ``j``.
    """
    g = per_sample.double()
    mean = g.mean(0)
    second = (g * g).mean(0)
    return float((mean * mean / (second - mean * mean + eps)).mean())


def tic_trace(per_sample: torch.Tensor, hessian_trace: float, eps: float = 1e-7) -> float:
    """Takeuchi information criterion, trace approximation (Cockpit ``TICTrace``):
    ``mean_i ‖g_i‖² / (tr H + eps)`` with ``H`` the Hessian of the mean loss of the batch."""
    g = per_sample.double()
    return float((g * g).sum(1).mean() / (hessian_trace + eps))


# -- curvature: Hutchinson trace and top eigenvalues -------------------------------------------
def hvp_operator(f: Callable[[Params], torch.Tensor], params: Params) -> Callable[[Params], Params]:
    """``v -> ∇²f(params) · v`` for many ``v`` at one point: the gradient graph is built once (double
    backward, kept between calls), so each product costs one backward pass. Equal to
    :func:`fedsim.clients.functional.hvp` (forward-over-reverse), which rebuilds everything per call."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    with torch.enable_grad():
        grads = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True, allow_unused=True)
    pairs = [(k, g) for k, g in zip(leaves, grads) if g is not None and g.requires_grad]

    def product(v: Params) -> Params:
        out = {k: torch.zeros_like(t) for k, t in leaves.items()}
        if pairs:
            hv = torch.autograd.grad([g for _, g in pairs], list(leaves.values()),
                                     grad_outputs=[v[k] for k, _ in pairs], retain_graph=True, allow_unused=True)
            out.update({k: h.detach() for k, h in zip(leaves, hv) if h is not None})
        return out

    return product


def _rademacher(like: Params, generator: torch.Generator) -> Params:
    return {k: (torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8) * 2 - 1).to(t.device, t.dtype)
            for k, t in like.items()}


def hutchinson_trace(f: Callable[[Params], torch.Tensor], params: Params, samples: int,
                     generator: torch.Generator) -> tuple[float, float]:
    """Hutchinson's estimate of ``tr ∇²f`` and its standard error.

    ``samples`` Rademacher vectors ``v`` give ``vᵀHv`` each (unbiased for the trace); returns their
    mean and ``std(ddof=1) / sqrt(samples)``.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2 for a standard error, got {samples}")
    draws = []
    product = hvp_operator(f, params)
    for _ in range(samples):
        v = _rademacher(params, generator)
        hv = product(v)
        draws.append(float(sum((v[k].double() * hv[k].double()).sum() for k in params)))
    arr = np.asarray(draws)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(samples))


def hessian_top_eigenvalues(f: Callable[[Params], torch.Tensor], params: Params, k: int, generator: torch.Generator,
                            method: str = "lanczos", max_iter: int = 100, tol: float = 1e-5) -> list[float]:
    """The ``k`` Hessian eigenvalues of largest magnitude, largest first (signed values).

    ``method="lanczos"``: implicitly restarted Lanczos (scipy ``eigsh``, ``which="LM"``) on a
    ``LinearOperator`` of Hessian-vector products, ``max_iter`` restarts, relative tolerance ``tol``,
    start vector from ``generator``. ``method="power"``: power iteration with deflation of the
    eigenvectors found, at most ``max_iter`` iterations per eigenvalue, stopping when the Rayleigh
    quotient changes by at most ``tol`` relative. Eigenvalues that do not converge are left out (the
    list is shorter than ``k``).
    """
    like = {n: t.detach() for n, t in params.items()}
    dim = sum(t.numel() for t in like.values())
    if not 1 <= k < dim:
        raise ValueError(f"k must be in [1, {dim - 1}] for a model of {dim} parameters, got {k}")

    product = hvp_operator(f, like)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        ref = next(iter(like.values()))
        return flat(product(unflat(v.to(ref.device, ref.dtype), like))).double()

    if method == "power":
        return _power_deflation(matvec, dim, k, generator, max_iter, tol)
    if method != "lanczos":
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    op = LinearOperator((dim, dim), dtype=np.float64,
                        matvec=lambda v: matvec(torch.from_numpy(np.ascontiguousarray(v).reshape(-1))).cpu().numpy())
    v0 = torch.randn(dim, generator=generator, dtype=torch.float64).numpy()
    try:
        vals = eigsh(op, k=k, which="LM", v0=v0, maxiter=max_iter, tol=tol, return_eigenvectors=False)
    except ArpackNoConvergence as err:
        vals = err.eigenvalues
    return sorted((float(v) for v in vals), key=abs, reverse=True)


def _power_deflation(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, k: int, generator: torch.Generator,
                     max_iter: int, tol: float) -> list[float]:
    found: list[tuple[float, torch.Tensor]] = []
    for _ in range(k):
        v = torch.randn(dim, generator=generator, dtype=torch.float64)
        v /= v.norm()
        prev, converged = None, False
        for _ in range(max_iter):
            w = matvec(v).cpu()
            for lam_j, u_j in found:
                w -= lam_j * (u_j @ v) * u_j
            lam = float(v @ w)
            norm = w.norm()
            if norm == 0:
                converged = True
                break
            v = w / norm
            if prev is not None and abs(lam - prev) <= tol * abs(lam):
                converged = True
                break
            prev = lam
        if not converged:
            break
        found.append((lam, v))
    return sorted((lam for lam, _ in found), key=abs, reverse=True)


# -- α: step-size quality of one step -----------------------------------------------------------
def fit_quadratic(t: float, fs: list[float], dfs: list[float], var_fs: list[float],
                  var_dfs: list[float]) -> np.ndarray | None:
    """Noise-weighted least-squares fit of ``q(s) = w0 + w1 s + w2 s²`` to ``q(0), q(t)`` (``fs``) and
    ``q'(0), q'(t)`` (``dfs``) observed with variances ``var_fs``, ``var_dfs`` (a zero variance is
    replaced by 1e-10, as in Cockpit). Returns ``[w0, w1, w2]``, or ``None`` for a singular system."""
    tiny = 1e-10
    variances = [v if v > 0 and math.isfinite(v) else tiny for v in [*var_fs, *var_dfs]]
    design = np.array([[1.0, 0.0, 0.0], [1.0, t, t * t], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0 * t]])
    weights = np.diag(1.0 / np.asarray(variances))
    obs = np.asarray([*fs, *dfs], dtype=np.float64)
    try:
        return np.linalg.solve(design.T @ weights @ design, design.T @ weights @ obs)
    except np.linalg.LinAlgError:
        return None


def alpha_from_fit(mu: np.ndarray | None, t: float) -> float:
    """α = 2t/ᾱ − 1 with ᾱ = −w1/w2 the step that lands at equal height on the far side: 0 at the 1-D
    minimum, 1 at the mirror point, > 1 overshooting, < 0 undershooting; −1 for a concave fit or no fit
    (Cockpit's convention)."""
    if mu is None or mu[2] <= 0 or mu[1] == 0:
        return -1.0
    return float(2.0 * t / (-mu[1] / mu[2]) - 1.0)


def step_alpha(losses: Callable[[Params], torch.Tensor], params: Params, step: Params) -> float:
    """α of the step ``params → params + step`` on per-example losses ``losses(params) -> [B]``.

    Loss values and per-example directional derivatives along the unit step direction (a ``jvp``, no
    per-example gradients stored) at both ends feed :func:`fit_quadratic`; variances are over examples
    (``ddof=1``). A zero step gives −1.
    """
    t = float(torch.sqrt(sum((s.double() ** 2).sum() for s in step.values())))
    if t == 0.0:
        return -1.0
    unit = {k: s / t for k, s in step.items()}
    end = {k: params[k] + step[k] for k in params}
    fs, dfs, var_fs, var_dfs = [], [], [], []
    for point in (params, end):
        vals, derivs = jvp(losses, ({k: v.detach() for k, v in point.items()},), (unit,))
        for stat, out in ((vals, (fs, var_fs)), (derivs, (dfs, var_dfs))):
            stat = stat.double().reshape(-1)
            out[0].append(float(stat.mean()))
            out[1].append(float(stat.var()) if stat.numel() > 1 else 0.0)
    return alpha_from_fit(fit_quadratic(t, fs, dfs, var_fs, var_dfs), t)


# -- layer-wise gradient spectra ------------------------------------------------------------------
def effective_rank(singular_values: torch.Tensor) -> float:
    """``exp(−Σ p_i log p_i)`` with ``p_i = σ_i / Σσ`` (0 for a zero matrix)."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def spectrum_stats(matrix: torch.Tensor) -> tuple[float, float]:
    """``(nuclear norm, effective rank)`` of a gradient; tensors of more than two dimensions (convolution
    kernels) are read as ``[out, rest]`` matrices."""
    m = matrix.detach().reshape(matrix.shape[0], -1).double()
    s = torch.linalg.svdvals(m)
    return float(s.sum()), effective_rank(s)
