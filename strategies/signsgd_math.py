"""Noisy signSGD with majority vote and noisy medianSGD (pure NumPy).

Reference
---------
Chen, Chen, Sun, Wu, Hong, "Distributed Training with Heterogeneous Data: Bridging Median- and
Mean-Based Algorithms", NeurIPS 2020 (arXiv 1906.01736). No official code. Spec:
``server-algorithms.md`` section 3.

signSGD with majority vote and medianSGD both follow the coordinate-wise MEDIAN of the workers'
gradients, so with heterogeneous data they stall where the median vanishes but the mean does not.
The fix: each worker perturbs its gradient BEFORE the sign or the median, ``g~_i = g_i + b xi_i``
with ``xi_i ~ N(0, I)``. Then ``E[sign(g + b xi)] = erf(g / (b sqrt 2)) ~ sqrt(2/pi) g / b``, which is
linear in ``g`` to first order, so the vote follows the MEAN gradient (bias ``O(|g|^3 / b^3)``).

Client side: :func:`noisy_sign` (+ :func:`pack_signs` for the 1-bit wire format) or :func:`perturb`.
Server side: :func:`unpack_signs`, :func:`majority_vote` / :func:`coordinate_median`, then
:func:`server_step`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsim.errors import AggregationError

__all__ = [
    "coordinate_median",
    "gradient_from_weights",
    "majority_vote",
    "noisy_median_step",
    "noisy_sign",
    "noisy_sign_step",
    "pack_signs",
    "packed_size",
    "perturb",
    "server_step",
    "unpack_signs",
    "vote_packed",
]


def perturb(g: np.ndarray, b: float, rng: np.random.Generator) -> np.ndarray:
    """``g + b * xi`` with ``xi ~ N(0, I)`` (float64); ``b = 0`` returns a float copy of ``g``."""
    g = np.asarray(g, dtype=np.float64)
    if b < 0:
        raise ValueError(f"noise scale b must be >= 0, got {b}")
    if b == 0:
        return g.copy()
    return g + b * rng.standard_normal(g.shape)


def noisy_sign(g: np.ndarray, b: float, rng: np.random.Generator, zero: str = "keep") -> np.ndarray:
    """Worker message ``sign(g + b xi)`` as int8.

    Parameters
    ----------
    zero
        What an exact zero becomes (only possible when ``b = 0``): ``"keep"`` (0, not 1-bit
        packable), ``"random"`` (+-1 with equal probability, unbiased) or ``"positive"`` (+1).
    """
    s = np.sign(perturb(g, b, rng)).astype(np.int8)
    if zero == "keep":
        return s
    zeros = s == 0
    if zero == "random":
        s[zeros] = np.where(rng.random(int(zeros.sum())) < 0.5, -1, 1).astype(np.int8)
    elif zero == "positive":
        s[zeros] = 1
    else:
        raise ValueError(f"zero must be 'keep', 'random' or 'positive', got {zero!r}")
    return s


def packed_size(d: int) -> int:
    """Bytes on the wire for ``d`` signs: ``ceil(d / 8)``."""
    return (int(d) + 7) // 8


def pack_signs(signs: np.ndarray) -> np.ndarray:
    """Pack a vector of +-1 into bits (1 = positive, little bit order); ``ceil(d/8)`` uint8."""
    s = np.asarray(signs).reshape(-1)
    if not np.all((s == 1) | (s == -1)):
        raise ValueError("pack_signs needs values in {-1, +1}; use noisy_sign(..., zero='random') "
                         "when exact zeros can occur")
    return np.packbits(s > 0, bitorder="little")


def unpack_signs(packed: np.ndarray, d: int) -> np.ndarray:
    """Inverse of :func:`pack_signs`: int8 vector of +-1 of length ``d``."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != packed_size(d):
        raise AggregationError(f"packed signs have {packed.size} bytes, expected {packed_size(d)} for d={d}",
                               "the client must pack exactly one bit per model coordinate")
    bits = np.unpackbits(packed, count=d, bitorder="little")
    return (2 * bits.astype(np.int8) - 1).astype(np.int8)


def majority_vote(signs: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """``sign(sum_i s_i)`` coordinate-wise as int8; ties give 0."""
    stacked = np.asarray(signs)
    if stacked.ndim < 2 or stacked.shape[0] == 0:
        raise AggregationError("majority vote needs at least one worker's signs", None)
    return np.sign(stacked.astype(np.int64).sum(axis=0)).astype(np.int8)


def vote_packed(packed: Sequence[np.ndarray], d: int) -> np.ndarray:
    """Majority vote over packed 1-bit messages (one per worker)."""
    return majority_vote(np.stack([unpack_signs(p, d) for p in packed]))


def coordinate_median(values: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Coordinate-wise median over workers (axis 0)."""
    stacked = np.asarray(values, dtype=np.float64)
    if stacked.ndim < 2 or stacked.shape[0] == 0:
        raise AggregationError("median needs at least one worker's values", None)
    return np.median(stacked, axis=0)


def server_step(x: np.ndarray, direction: np.ndarray, delta: float) -> np.ndarray:
    """``x - delta * direction`` (the direction is a vote or a median)."""
    return np.asarray(x, dtype=np.float64) - delta * np.asarray(direction, dtype=np.float64)


def noisy_sign_step(x: np.ndarray, grads: Sequence[np.ndarray], b: float, delta: float,
                    rng: np.random.Generator) -> np.ndarray:
    """One noisy-signSGD round: every worker sends ``sign(g_i + b xi_i)``, server votes and steps."""
    return server_step(x, majority_vote([noisy_sign(g, b, rng) for g in grads]), delta)


def noisy_median_step(x: np.ndarray, grads: Sequence[np.ndarray], b: float, delta: float,
                      rng: np.random.Generator) -> np.ndarray:
    """One noisy-medianSGD round: ``x - delta * median_i(g_i + b xi_i)``."""
    return server_step(x, coordinate_median([perturb(g, b, rng) for g in grads]), delta)


def gradient_from_weights(w_new: np.ndarray, w_old: np.ndarray, lr: float) -> np.ndarray:
    """Recover a one-step gradient from weights, ``g = -(w_new - w_old) / lr``."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return -(np.asarray(w_new, dtype=np.float64) - np.asarray(w_old, dtype=np.float64)) / lr
