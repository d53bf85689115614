"""Pure math of centered clipping and bucketing, over flattened updates (rows of a matrix).

* Centered clipping — Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
  Optimization", ICML 2021, eq. (CC): starting from ``v_0`` (the previous round's aggregate),
  ``v_{l+1} = v_l + (1/m) Σ_i (x_i − v_l) · min(1, τ / ‖x_i − v_l‖)`` for ``l = 0..L−1``.
  One update moves the result by at most ``τ/m`` per iteration, whatever it holds.
* Bucketing — Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing", ICLR 2022 (Algorithm 1): a random permutation of the ``m`` updates is cut into
  ``⌈m/s⌉`` buckets of ``s`` (the last one may be smaller) and each bucket is averaged before the
  robust aggregator runs; it reduces the heterogeneity the aggregator sees.

Nothing here touches Flower, torch or randomness (the permutation is an argument).
"""

from __future__ import annotations

import numpy as np


def clip_weights(diffs: np.ndarray, tau: float) -> np.ndarray:
    """``min(1, τ / ‖d_i‖)`` per row of ``diffs`` (1 for a zero row)."""
    norms = np.linalg.norm(diffs, axis=1)
    with np.errstate(divide="ignore"):
        return np.where(norms > tau, tau / np.where(norms > 0, norms, 1.0), 1.0)


def centered_clip(updates: np.ndarray, v0: np.ndarray, tau: float, iterations: int = 1) -> tuple[np.ndarray, float]:
    """Centered clipping of the rows of ``updates`` (shape ``(m, d)``) around ``v0`` (shape ``(d,)``).

    Parameters
    ----------
    updates
        One flattened update per row, ``m >= 1``.
    v0
        The starting centre (Karimireddy et al. use the previous aggregate: the server momentum).
    tau
        Clipping radius ``τ > 0``.
    iterations
        ``L >= 1`` clipping iterations.

    Returns
    -------
    The aggregate ``v_L`` and the fraction of rows clipped in the last iteration.
    """
    x = np.asarray(updates, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError("need a non-empty (m, d) matrix of updates")
    if not tau > 0 or iterations < 1:
        raise ValueError(f"tau must be > 0 and iterations >= 1, got {tau}, {iterations}")
    v = np.asarray(v0, dtype=np.float64).copy()
    clipped = 0.0
    for _ in range(iterations):
        diffs = x - v[None, :]
        w = clip_weights(diffs, tau)
        v = v + (w[:, None] * diffs).mean(axis=0)
        clipped = float(np.mean(w < 1.0))
    return v, clipped


def bucket_means(updates: np.ndarray, bucket_size: int, permutation: np.ndarray) -> np.ndarray:
    """Means of buckets of ``bucket_size`` rows taken in ``permutation`` order (``s = 1``: the rows)."""
    x = np.asarray(updates, dtype=np.float64)
    perm = np.asarray(permutation)
    if bucket_size < 1 or sorted(perm.tolist()) != list(range(x.shape[0])):
        raise ValueError("bucket_size must be >= 1 and permutation a permutation of the rows")
    x = x[perm]
    return np.stack([x[i:i + bucket_size].mean(axis=0) for i in range(0, x.shape[0], bucket_size)])
