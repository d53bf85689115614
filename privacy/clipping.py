"""Client-level DP math: clipping, Gaussian noise and DP-FedAvg aggregation over ``list[np.ndarray]``.

Pure functions; the strategy that calls them owns randomness (a ``np.random.Generator`` seeded per
(round, mechanism)) and accounting.

References
----------
McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (DP-FedAvg, flat and per-layer clipping).
Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021 (geometric quantile update of the clip norm).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fedsim.errors import AggregationError, ConfigError

__all__ = [
    "DPAggregate",
    "adaptive_noise_multiplier",
    "clip_flat",
    "clip_per_layer",
    "dp_fedavg_aggregate",
    "gaussian_noise_for_sum",
    "global_l2_norm",
    "per_layer_bounds",
    "update_clip_norm",
]

Update = Sequence[np.ndarray]


def _check_finite(update: Update) -> None:
    for i, layer in enumerate(update):
        if not np.all(np.isfinite(layer)):
            raise AggregationError(f"update layer {i} contains NaN or Inf; it cannot be clipped",
                                   "reject this client's reply before aggregation")


def _scaled_norm(update: Update) -> tuple[float, float]:
    """(top, s) with top = max |x| over all layers and s = ‖u/top‖ ∈ [1, sqrt(n)]: ‖u‖ = top·s
    without overflow (values near the float maximum) or underflow (denormals)."""
    arrays = [np.abs(np.asarray(layer, dtype=np.float64)).ravel() for layer in update]
    top = max((float(a.max()) for a in arrays if a.size), default=0.0)
    if top == 0.0:
        return 0.0, 0.0
    return top, math.sqrt(math.fsum(float(np.sum(np.square(a / top))) for a in arrays))


def global_l2_norm(update: Update) -> float:
    """ℓ2 norm of all layers of ``update`` taken together (float64; ``inf`` only if it overflows)."""
    _check_finite(update)
    top, scaled = _scaled_norm(update)
    with np.errstate(over="ignore"):
        return float(np.float64(top) * scaled)


def clip_flat(update: Update, clip_norm: float) -> tuple[list[np.ndarray], float]:
    """Scale ``update`` by min(1, C/‖u‖) with ‖u‖ the global ℓ2 norm over all layers.

    Returns the clipped update (same float dtypes; the input arrays themselves when ‖u‖ ≤ C) and
    ‖u‖ before clipping.
    """
    if not clip_norm > 0:
        raise ConfigError("privacy.clip_norm", f"must be > 0, got {clip_norm}", "use e.g. 0.1–10")
    norm = global_l2_norm(update)
    if norm <= clip_norm:
        return [np.asarray(layer) for layer in update], norm
    top, scaled = _scaled_norm(update)
    # u·C/‖u‖ = (u/top)·(C/s); shave 1e-12 relative so rounding cannot leave the norm above C.
    factor = (clip_norm / scaled) * (1.0 - 1e-12)
    out = []
    for layer in update:
        arr = np.asarray(layer)
        dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
        out.append(((arr.astype(np.float64) / top) * factor).astype(dtype, copy=False))
    return out, norm


def per_layer_bounds(clip_norm: float, shapes: Sequence[tuple[int, ...]], how: str = "equal") -> list[float]:
    """Per-layer bounds C_j with sqrt(Σ C_j²) = C.

    ``how="equal"``: C_j = C/sqrt(k); ``how="size"``: C_j = C·sqrt(n_j/Σn) (proportional to the
    square root of the layer's number of entries).
    """
    k = len(shapes)
    if k == 0:
        return []
    if how == "equal":
        return [clip_norm / math.sqrt(k)] * k
    if how == "size":
        sizes = np.array([max(1, int(np.prod(s))) for s in shapes], dtype=np.float64)
        return list(clip_norm * np.sqrt(sizes / sizes.sum()))
    raise ConfigError("privacy.per_layer", f"unknown per-layer split {how!r}", "use 'equal' or 'size'")


def clip_per_layer(update: Update, layer_bounds: Sequence[float]) -> tuple[list[np.ndarray], list[float]]:
    """Clip each layer j to ℓ2 norm C_j (McMahan et al. 2018); returns the update and the norms.

    With bounds from :func:`per_layer_bounds` the clipped update has global norm ≤ C.
    """
    if len(layer_bounds) != len(update):
        raise ConfigError("privacy.per_layer", f"{len(layer_bounds)} bounds for {len(update)} layers",
                          "pass one bound per layer (see per_layer_bounds)")
    _check_finite(update)
    out, norms = [], []
    for layer, bound in zip(update, layer_bounds):
        clipped, norm = clip_flat([layer], bound)
        out.append(clipped[0])
        norms.append(norm)
    return out, norms


def gaussian_noise_for_sum(shapes: Sequence[tuple[int, ...]], sigma: float, rng: np.random.Generator,
                           dtype: type = np.float64) -> list[np.ndarray]:
    """Independent N(0, σ²) noise, one array per shape."""
    if sigma < 0:
        raise ConfigError("privacy.noise", f"σ must be >= 0, got {sigma}", "use a non-negative noise std")
    return [(rng.standard_normal(tuple(s)) * sigma).astype(dtype, copy=False) for s in shapes]


class DPAggregate(NamedTuple):
    """Output of :func:`dp_fedavg_aggregate`."""

    update: list[np.ndarray]
    """Mean of the clipped updates plus noise (float64 arrays)."""
    noise_std: float
    """Std of the noise added to each coordinate of the mean, z·C/m."""
    norms: list[float]
    """Global ℓ2 norm of every client update before clipping."""
    clipped_fraction: float
    """Fraction of clients whose update was clipped."""


def dp_fedavg_aggregate(updates: Sequence[Update], clip_norm: float, noise_multiplier: float,
                        rng: np.random.Generator, *, denominator: int | None = None,
                        layer_bounds: Sequence[float] | None = None) -> DPAggregate:
    """DP-FedAvg with uniform weights: (Σ_i clip(Δ_i) + N(0, (zC)²)) / m.

    Parameters
    ----------
    updates : list of list of np.ndarray
        One update (list of layers) per client that answered.
    clip_norm : float
        C, the ℓ2 bound of one client's contribution (the global bound when per-layer).
    noise_multiplier : float
        z; the noise on the mean has std z·C/m.
    rng : np.random.Generator
        Source of the noise.
    denominator : int, optional
        m, the number of clients SAMPLED (fixed denominator). Defaults to ``len(updates)``; pass the
        sampled count so that dropouts do not shrink the noise relative to the sensitivity C/m.
    layer_bounds : list of float, optional
        Clip per layer with these bounds (their quadrature sum should be C).
    """
    if not updates:
        raise AggregationError("no client update to aggregate", "lower min_responses or check client failures")
    m = len(updates) if denominator is None else int(denominator)
    if m < len(updates) or m < 1:
        raise ConfigError("privacy.denominator", f"denominator {m} is below the {len(updates)} updates",
                          "pass the number of clients sampled this round")
    shapes = [np.shape(layer) for layer in updates[0]]
    total = [np.zeros(s, dtype=np.float64) for s in shapes]
    norms, clipped = [], 0
    for upd in updates:
        if [np.shape(layer) for layer in upd] != shapes:
            raise AggregationError("client updates have different shapes",
                                   "validate replies against the global model before aggregation")
        if layer_bounds is None:
            out, norm = clip_flat(upd, clip_norm)
            clipped += norm > clip_norm
        else:
            out, layer_norms = clip_per_layer(upd, layer_bounds)
            norm = global_l2_norm([np.asarray(layer_norms)])
            clipped += any(n > b for n, b in zip(layer_norms, layer_bounds))
        norms.append(norm)
        for acc, layer in zip(total, out):
            acc += layer
    noise = gaussian_noise_for_sum(shapes, noise_multiplier * clip_norm, rng)
    mean = [(acc + z) / m for acc, z in zip(total, noise)]
    return DPAggregate(mean, noise_multiplier * clip_norm / m, norms, clipped / len(updates))


# ------------------------------------------------------------------------------ adaptive clipping
def adaptive_noise_multiplier(total_noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Noise multiplier z_Δ left for the update when σ_b is spent on the clipped count.

    The count of unclipped clients, centred (b_i − 1/2), has sensitivity 1/2, so its Gaussian of std
    σ_b has noise multiplier 2σ_b. The pair of releases is as private as one Gaussian of multiplier z
    when z⁻² = z_Δ⁻² + (2σ_b)⁻², i.e. z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, §3).
    """
    z, sb = float(total_noise_multiplier), float(clipped_count_stddev)
    if z <= 0:
        raise ConfigError("privacy.noise_multiplier", f"must be > 0 for adaptive clipping, got {z}",
                          "use a positive noise multiplier")
    if sb <= 0 or (2.0 * sb) <= z:
        raise ConfigError("privacy.count_noise",
                          f"σ_b={sb:g} leaves no budget for the update: need 2σ_b > z={z:g}",
                          "raise privacy.count_noise (Andrew et al. suggest σ_b = m/20 for m clients a round)")
    return (z ** -2 - (2.0 * sb) ** -2) ** -0.5


def update_clip_norm(clip_norm: float, unclipped_count: int, denominator: int, target_quantile: float,
                     learning_rate: float, clipped_count_stddev: float, rng: np.random.Generator) -> float:
    """Geometric quantile update C ← C·exp(−η(b̃ − γ)) (Andrew et al. 2021, Alg. 1).

    b̃ = (Σ_i 1[‖Δ_i‖ ≤ C] + N(0, σ_b²)) / m is the noisy fraction of unclipped updates, γ the
    target quantile (0.5 is the paper's default) and η the clip learning rate (0.2).
    """
    if not 0 <= target_quantile <= 1:
        raise ConfigError("privacy.target_quantile", f"must lie in [0, 1], got {target_quantile}",
                          "0.5 clips at the median update norm")
    noisy_fraction = (unclipped_count + clipped_count_stddev * rng.standard_normal()) / denominator
    return float(clip_norm * math.exp(-learning_rate * (noisy_fraction - target_quantile)))
