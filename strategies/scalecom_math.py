"""ScaleCom's pure math: cyclic local top-k (CLT-k) with a shared index set, low-pass filtered error
feedback, and the server's aggregation of the sparse updates.

Chen, Chen, Ni, Zhang, Wang, Lee, Gopalakrishnan, "ScaleCom: Scalable Sparsified Gradient Compression
for Communication-Efficient Distributed Training", NeurIPS 2020. In each step one worker, the
*leader* (rotating cyclically), picks the top-k coordinates of its error-compensated vector
``a = m + g``; every worker sends its own ``a`` at those indices, so the sparse vectors share one
support and sum without fill-in. The memory is low-pass filtered,
``m' = (1 - β) m + β (a - C(a))`` with ``C(a)`` = ``a`` on the indices, 0 elsewhere; ``β = 1`` is
standard error feedback ``m' = a - C(a)``.

Vectors here are flat float arrays over the model's floating tensors; ``segments`` gives each
tensor's ``(start, length)`` and top-k is taken per tensor (layer-wise, ``k = ceil(density · n)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["layer_k", "clt_k_indices", "leader_of", "compress", "ef_update", "aggregate_sparse", "segments_of"]


def segments_of(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, length)`` of consecutive tensors of the given sizes in a flat vector."""
    out, start = [], 0
    for n in sizes:
        out.append((start, int(n)))
        start += int(n)
    return out


def layer_k(n: int, density: float) -> int:
    """Coordinates kept in a tensor of ``n``: ``ceil(density · n)`` (at least 1 when ``n > 0``)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return min(n, max(1, math.ceil(density * n))) if n > 0 else 0


def clt_k_indices(acc: np.ndarray, segments: Sequence[tuple[int, int]], density: float) -> np.ndarray:
    """The leader's indices: per tensor, the ``k`` largest ``|acc|`` (ties to the lower index),
    as ascending positions in the flat vector (int64)."""
    acc = np.asarray(acc)
    picks = []
    for start, n in segments:
        k = layer_k(n, density)
        if k == n:
            picks.append(np.arange(start, start + n, dtype=np.int64))
            continue
        mag = np.abs(acc[start:start + n])
        order = np.argsort(-mag, kind="stable")[:k]
        picks.append(np.sort(order).astype(np.int64) + start)
    return np.concatenate(picks) if picks else np.zeros(0, np.int64)


def leader_of(server_round: int, sampled: Sequence[int], num_partitions: int) -> int:
    """The round's leader: partition ``(round - 1) mod N``, or the next sampled one after it (cyclic)."""
    if not sampled:
        raise ValueError("no client sampled")
    first = (server_round - 1) % max(num_partitions, 1)
    ordered = sorted(sampled)
    return next((p for p in ordered if p >= first), ordered[0])


def compress(acc: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``C(a)`` sent as values: ``a`` at the shared indices."""
    return np.asarray(acc)[np.asarray(indices, dtype=np.int64)]


def ef_update(memory: np.ndarray, acc: np.ndarray, indices: np.ndarray, beta: float) -> np.ndarray:
    """Low-pass filtered error feedback ``m' = (1 - β) m + β (a - C(a))`` (``β = 1``: standard EF)."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    residual = np.array(acc, copy=True)
    residual[np.asarray(indices, dtype=np.int64)] = 0
    if beta == 1.0:
        return residual
    return ((1.0 - beta) * np.asarray(memory) + beta * residual).astype(residual.dtype, copy=False)


def aggregate_sparse(values: Sequence[np.ndarray], weights: Sequence[float], indices: np.ndarray,
                     size: int) -> np.ndarray:
    """Dense weighted mean of sparse updates sharing ``indices``: ``Σ w_i v_i / Σ w_i`` on the
    indices, 0 elsewhere (float64)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(values) == 0 or len(w) != len(values) or np.any(w < 0) or w.sum() <= 0 or not np.isfinite(w).all():
        raise ValueError("need one finite non-negative weight per update, not all zero")
    idx = np.asarray(indices, dtype=np.int64)
    mean = np.zeros(len(idx), dtype=np.float64)
    for wi, v in zip(w / w.sum(), values):
        mean += wi * np.asarray(v, dtype=np.float64)
    out = np.zeros(int(size), dtype=np.float64)
    out[idx] = mean
    return out
