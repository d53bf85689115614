"""The orthonormal DCT basis and column selection by alignment, for low-rank gradient methods.

Modoranu et al., "SVD-Free Low-Rank Adaptive Gradient Optimization", 2025 (arXiv 2505.17967; code
IST-DASLab "Trion / DCT-AdamW", column strategy "topk-largest"); spec ``client-plugins.md`` §B.8. Instead of an SVD
of the gradient ``G`` (``m × n``), project it onto ``r`` columns of the fixed orthonormal DCT-II
matrix ``Q`` (``n × n``): compute ``S = G Q``, keep the ``r`` columns of ``S`` with the largest ℓ1
norm (indices ``I``), so ``P = Q[:, I]`` and the low-rank gradient is ``S[:, I] = G P``; ``G ≈ G P Pᵀ``.
Only ``I`` needs storing: ``Q`` depends on ``n`` alone.

Pure functions, used by the ``dct_lowrank`` and ``frugal`` transforms
(:mod:`fedsim.clients.transforms_lowrank`) and usable for uplink compression (send ``S[:, I]`` and
``I``; the receiver rebuilds ``Q`` from ``n`` and reconstructs with :func:`reconstruct`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["dct_matrix", "select_columns", "project", "reconstruct", "basis"]


@lru_cache(maxsize=32)
def _dct_matrix_cpu(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    q = torch.cos(math.pi * (2 * i[:, None] + 1) * k[None, :] / (2 * n)) * math.sqrt(2.0 / n)
    q[:, 0] = math.sqrt(1.0 / n)
    return q


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal DCT-II matrix ``Q`` (``n × n``): column ``k`` is the ``k``-th cosine,
    ``Q[i, k] = c_k cos(π (2i + 1) k / (2n))`` with ``c_0 = √(1/n)``, ``c_k = √(2/n)``; ``QᵀQ = I``."""
    if n < 1:
        raise ValueError(f"the DCT needs n >= 1, got {n}")
    return _dct_matrix_cpu(int(n)).to(dtype=dtype, device=device)


def select_columns(g: torch.Tensor, r: int, q: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (int64, ascending) of the ``r`` columns of ``S = g Q`` with the largest ℓ1 norm.

    Ties are broken by the lower index (a stable sort), so the choice is deterministic.
    """
    n = int(g.shape[-1])
    if not 0 <= r <= n:
        raise ValueError(f"rank must be in [0, {n}], got {r}")
    q = dct_matrix(n, g.dtype, g.device) if q is None else q
    score = (g @ q).abs().sum(dim=0)
    order = torch.sort(score, descending=True, stable=True).indices[:r]
    return torch.sort(order).values.to(torch.int64)


def basis(n: int, indices: torch.Tensor, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """``P = Q[:, indices]`` (``n × r``), orthonormal columns."""
    return dct_matrix(n, dtype, device)[:, indices.to(device)]


def project(g: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Coefficients ``g P`` (``m × r``) of ``g`` (``m × n``) on the selected DCT columns."""
    return g @ basis(int(g.shape[-1]), indices, g.dtype, g.device)


def reconstruct(coefficients: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """``coefficients Pᵀ`` (``m × n``): exact for a ``g`` supported on the selected columns."""
    return coefficients @ basis(n, indices, coefficients.dtype, coefficients.device).T
