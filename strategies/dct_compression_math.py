"""DCT low-rank compression of a model update: pure functions over NumPy arrays.

Modoranu et al., "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models", 2025
(spec ``client-plugins.md`` §B.8), used here on the uplink: a matrix update ``M`` (``rows × n``,
``n`` its smaller side; conv kernels are seen as ``out × rest``) is sent as the coefficients
``S_I = M Q[:, I]`` (``rows × r``) on the ``r`` DCT-II columns ``I`` most aligned with it (largest ℓ1
norm of ``M Q``), plus ``I``; the receiver rebuilds ``Q`` from ``n`` and reconstructs
``M̂ = S_I Q[:, I]ᵀ``. Exact when ``r = n`` (``Q`` is orthonormal) or when ``M`` lies in the span of
the chosen columns. The DCT itself is :mod:`fedsim.clients.dct` (shared with the optimizer transform).
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.clients import dct

__all__ = ["rank_for", "compress", "reconstruct", "payload_bytes"]


def rank_for(n: int, density: float) -> int:
    """Columns kept of ``n``: ``round(density · n)``, at least 1, at most ``n``."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return min(n, max(1, int(round(density * n))))


def _as_matrix(shape: tuple[int, ...]) -> tuple[tuple[int, int], bool]:
    """``((rows, n), transposed)``: the matrix view of a tensor, with ``n`` the smaller side."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    return ((cols, rows), True) if rows < cols else ((rows, cols), False)


def compress(update: np.ndarray, density: float) -> tuple[np.ndarray, np.ndarray]:
    """``(coefficients float32 rows × r, indices int32 r)`` of a tensor with at least 2 dimensions."""
    a = np.asarray(update)
    if a.ndim < 2:
        raise ValueError("DCT compression needs a tensor with at least 2 dimensions")
    (_, n), transposed = _as_matrix(a.shape)
    m = torch.from_numpy(np.ascontiguousarray(a.reshape(a.shape[0], -1), dtype=np.float64))
    if transposed:
        m = m.T
    idx = dct.select_columns(m, rank_for(n, density))
    return dct.project(m, idx).to(torch.float32).numpy(), idx.to(torch.int32).numpy()


def reconstruct(coefficients: np.ndarray, indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor of ``shape`` (float64) rebuilt from its coefficients and column indices."""
    (rows, n), transposed = _as_matrix(tuple(shape))
    c = np.asarray(coefficients, dtype=np.float64)
    idx = np.asarray(indices, dtype=np.int64)
    if c.shape != (rows, len(idx)) or idx.ndim != 1 or len(np.unique(idx)) != len(idx) \
            or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
        raise ValueError(f"coefficients {c.shape} / indices {idx.shape} do not fit a tensor of shape {tuple(shape)}")
    m = dct.reconstruct(torch.from_numpy(c), torch.from_numpy(idx), n).numpy()
    return (m.T if transposed else m).reshape(shape)


def payload_bytes(shape: tuple[int, ...], density: float) -> int:
    """Bytes of the arrays sent for one tensor: float32 coefficients + int32 indices (≥ 2-D), else
    the float32 tensor itself."""
    if len(shape) < 2:
        return 4 * int(np.prod(shape))
    (rows, n), _ = _as_matrix(tuple(shape))
    r = rank_for(n, density)
    return 4 * rows * r + 4 * r
