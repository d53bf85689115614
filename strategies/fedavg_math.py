"""Pure aggregation math over client updates, testable without Flower.

An update is a list of NumPy arrays (one per model tensor, in a fixed key order); a batch of
updates is a list of such lists. Nothing here touches Flower, torch or randomness.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Arrays = list[np.ndarray]


def weighted_mean(updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """Per-tensor weighted mean ``Σ w_i u_i / Σ w_i`` (McMahan et al., AISTATS 2017, FedAvg).

    Accumulates in float64 and returns each tensor in its input dtype; integer tensors
    (e.g. BatchNorm's ``num_batches_tracked``) are rounded.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != len(updates) or len(updates) == 0:
        raise ValueError("need one weight per update and at least one update")
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    w = w / w.sum()
    out = []
    for layer in zip(*updates):
        acc = np.zeros(layer[0].shape, dtype=np.float64)
        for wi, a in zip(w, layer):
            acc += wi * a
        out.append(_cast(acc, layer[0].dtype))
    return out


def coordinate_median(updates: Sequence[Arrays]) -> Arrays:
    """Coordinate-wise median (Yin et al., ICML 2018)."""
    return [_cast(np.median(np.stack(layer).astype(np.float64), axis=0), layer[0].dtype)
            for layer in zip(*updates)]


def trimmed_per_side(beta: float, m: int) -> int:
    """Values the β-trimmed mean drops at each end of a coordinate among ``m``: ``floor(β·m)``."""
    return int(np.floor(beta * m))


def trimmed_mean(updates: Sequence[Arrays], beta: float) -> Arrays:
    """Coordinate-wise β-trimmed mean: drop the ``floor(β·m)`` largest and smallest values per coordinate.

    Yin, Chen, Ramchandran, Bartlett, ICML 2018. ``0 <= beta < 0.5``.
    """
    m = len(updates)
    k = trimmed_per_side(beta, m)
    if not 0 <= beta < 0.5 or m - 2 * k < 1:
        raise ValueError(f"beta={beta} leaves no value to average among {m} updates")
    out = []
    for layer in zip(*updates):
        s = np.sort(np.stack(layer).astype(np.float64), axis=0)
        out.append(_cast(s[k:m - k].mean(axis=0), layer[0].dtype))
    return out


def flatten(update: Arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in update]) if update else np.zeros(0)


def krum_scores(updates: Sequence[Arrays], num_malicious: int) -> np.ndarray:
    """Krum score of each update: sum of squared distances to its ``m - f - 2`` nearest neighbours.

    Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017.
    """
    m = len(updates)
    flat = np.stack([flatten(u) for u in updates])
    sq = np.sum(flat**2, axis=1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * flat @ flat.T, 0.0)
    k = max(m - num_malicious - 2, 1)
    scores = np.empty(m)
    for i in range(m):
        others = np.delete(d[i], i)
        scores[i] = np.sort(others)[:k].sum()
    return scores


def multi_krum(updates: Sequence[Arrays], num_malicious: int, num_selected: int = 1) -> tuple[Arrays, list[int]]:
    """Average of the ``num_selected`` updates with the lowest Krum scores (``1`` = Krum)."""
    scores = krum_scores(updates, num_malicious)
    chosen = [int(i) for i in np.argsort(scores, kind="stable")[:max(num_selected, 1)]]
    return weighted_mean([updates[i] for i in chosen], [1.0] * len(chosen)), chosen


def fedopt_step(
    params: Arrays, delta: Arrays, m: Arrays | None, v: Arrays | None, *, kind: str,
    eta: float, beta_1: float, beta_2: float, tau: float,
) -> tuple[Arrays, Arrays, Arrays]:
    """One server-optimiser step on the pseudo-gradient ``delta`` (mean client update).

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2:
    ``m = β1 m + (1-β1) Δ``; Adagrad ``v += Δ²``; Adam ``v = β2 v + (1-β2) Δ²``;
    Yogi ``v = v - (1-β2) Δ² sign(v - Δ²)``; ``x = x + η m / (sqrt(v) + τ)``.
    """
    if m is None:
        m = [np.zeros_like(d, dtype=np.float64) for d in delta]
    if v is None:
        v = [np.zeros_like(d, dtype=np.float64) for d in delta]
    new_p, new_m, new_v = [], [], []
    for p, d, mi, vi in zip(params, delta, m, v):
        d64 = d.astype(np.float64)
        mi = beta_1 * mi + (1 - beta_1) * d64
        d2 = d64 * d64
        if kind == "adagrad":
            vi = vi + d2
        elif kind == "adam":
            vi = beta_2 * vi + (1 - beta_2) * d2
        elif kind == "yogi":
            vi = vi - (1 - beta_2) * d2 * np.sign(vi - d2)
        else:
            raise ValueError(f"unknown server optimiser '{kind}'")
        step = p.astype(np.float64) + eta * mi / (np.sqrt(vi) + tau)
        new_p.append(_cast(step, p.dtype))
        new_m.append(mi)
        new_v.append(vi)
    return new_p, new_m, new_v


def _cast(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        return np.rint(a).astype(dtype)
    return a.astype(dtype, copy=False)
