"""FedLD principal-gradient aggregation (pure NumPy, no Flower).

Reference
---------
Zeng, Guo, Wang, Wang, Zhou, Qu, "Tackling Data Heterogeneity in Federated Learning via Loss
Decomposition", MICCAI 2024 (arXiv 2408.12300); official code Zeng-Shuang/FedLD,
``svd_tools.py::pcgrad_svd``. Spec: ``server-algorithms.md`` section 1.

The server aggregates every ``state_dict`` key on its own. With ``G`` the ``m x d`` matrix of the
clients' flattened deltas ``g_i = w_i - w_g`` for that key:

1. ``H = G G^T / m = E diag(s) E^T`` (eigenvalues ``s`` descending; ``sum(s)`` runs over all m).
2. Principal directions ``v_j = sum_i E_ij g_i`` (so ``||v_j||^2 = m s_j``), the first
   ``k = floor(m * kappa)`` of them, each sign-aligned with the majority of the clients.
3. Each client is replaced by a norm-preserving mixture of those directions,
   ``r_i = sum_{j<k} ||g_i|| (s_j / sum(s)) sign(<g_i, v_j>) v_j / ||v_j||``.
4. ``delta = mean_i r_i`` (unweighted; sample counts are ignored, as in the reference).

The first time a key is seen (and for scalar buffers such as ``num_batches_tracked``, and for
integer arrays) the plain unweighted mean of the deltas is used instead.

Because ``<g_i, v_j> = (G G^T E)_ij`` and ``||v_j|| = sqrt(m s_j)``, everything is computed from the
``m x m`` Gram matrix and one final ``m``-term combination of the rows of ``G``: two passes over the
``m x d`` data, whatever ``k``.

Guards that the reference lacks (spec section 1, "Guards"):

* directions with ``s_j <= rel_tol * s_1`` are skipped (the reference divides 0 by 0 there);
* a client orthogonal to a direction (``|cos| <= sign_tol``) gets no component along it (the
  reference divides by a zero norm); ``sign_tol`` also keeps the result stable under rounding;
* ``k = 0`` (``m * kappa < 1``) falls back to the mean;
* partial participation: ``m`` is the number of replies, never the population size.

Note: step 2's majority sign alignment cannot change ``r_i`` (``sign(<g,v>) v`` is invariant under
``v -> -v``); it is kept for fidelity and exposed by :func:`principal_directions`.

Near-orthogonal updates (not in the paper; issue 12, measured in ``bench/RESULTS.md``). Step 3 gives
client ``i`` its FULL norm along every kept direction, whatever the projection length, so clients
nearly orthogonal to each other (strong label skew: median pairwise cosine about -0.1 on digits at
Dirichlet 0.1, against 0.7 IID) add ``+-||g_i||`` coin-flip terms and the aggregate turns away from
the mean (cosine 0.73, 0.37 of its norm) and accuracy collapses. Weighting by the projection
``<g_i, v_j>`` instead was measured worse (it shrinks the step further). :class:`FedLDAggregator`
therefore reports the regime every round (:func:`update_alignment`, the step's cosine and norm
ratio to the plain mean) and, with ``guard = "alignment"``, mixes the paper's aggregate with the
plain unweighted mean, ``delta = w delta_FedLD + (1 - w) mean`` with
``w = clip(alignment / min_alignment, 0, 1)`` (:func:`guard_weight`). ``guard = "none"`` (default)
is the paper's aggregation, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedsim.errors import AggregationError, ConfigError

__all__ = [
    "GUARDS",
    "FedLDAggregator",
    "fedld_aggregate",
    "fedld_aggregate_layer",
    "fedld_client_projections",
    "guard_weight",
    "num_principal_directions",
    "principal_directions",
    "update_alignment",
]

DEFAULT_KAPPA = 0.8
DEFAULT_REL_TOL = 1e-12
DEFAULT_SIGN_TOL = 1e-9
DEFAULT_MIN_ALIGNMENT = 0.5
GUARDS = ("none", "alignment")


def num_principal_directions(m: int, kappa: float) -> int:
    """``k = floor(m * kappa)`` with a 1e-9 slack so that e.g. ``0.57 * 100`` gives 57, not 56."""
    return int(math.floor(m * kappa + 1e-9))


def _check_kappa(kappa: float) -> None:
    if not (0.0 < kappa <= 1.0) or not math.isfinite(kappa):
        raise ConfigError("strategy.kappa", f"must be in (0, 1], got {kappa!r}",
                          "FedLD keeps floor(m * kappa) principal directions; the paper uses 0.8")


def _stack(deltas: Sequence[np.ndarray], key: object = None) -> np.ndarray:
    """Stack client deltas of one key into an ``m x d`` array, validating shapes and values."""
    if len(deltas) == 0:
        raise AggregationError(f"FedLD: no client delta for key {key!r}",
                               "aggregate only rounds with at least one valid reply")
    shape = np.shape(deltas[0])
    for i, g in enumerate(deltas):
        if np.shape(g) != shape:
            raise AggregationError(
                f"FedLD: key {key!r}: client {i} has shape {np.shape(g)}, client 0 has {shape}",
                "all clients must return the same model architecture")
    stacked = np.stack([np.asarray(g) for g in deltas]).reshape(len(deltas), -1)
    if np.issubdtype(stacked.dtype, np.floating) and not np.all(np.isfinite(stacked)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(stacked), axis=1))[0])
        raise AggregationError(f"FedLD: key {key!r}: client {bad} sent NaN or inf",
                               "validate replies before aggregation and drop non-finite ones")
    return stacked


def _spectrum(G: np.ndarray, rel_tol: float, sign_tol: float):
    """Eigen-decomposition of ``G G^T / m`` and the clients' signed cosines to each direction.

    Returns ``s`` (descending, clipped at 0), ``E`` (columns = eigenvectors, majority-aligned),
    ``norms`` (``||g_i||``), ``signs`` (``m x m``: sign of ``<g_i, v_j>``, 0 when orthogonal or when
    ``v_j`` is negligible) and ``usable`` (bool per direction: ``s_j > rel_tol * s_1``).
    """
    m = G.shape[0]
    G64 = G.astype(np.float64, copy=False)
    gram = G64 @ G64.T
    gram = 0.5 * (gram + gram.T)
    s, E = np.linalg.eigh(gram / m)
    order = np.argsort(s)[::-1]
    s, E = np.clip(s[order], 0.0, None), E[:, order]
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    usable = s > rel_tol * s[0] if s[0] > 0 else np.zeros(m, dtype=bool)
    inner = gram @ E                                   # <g_i, v_j>
    v_norm = np.sqrt(m * s)
    denom = np.outer(norms, v_norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, inner / np.where(denom > 0, denom, 1.0), 0.0)
    signs = np.where(np.abs(cos) > sign_tol, np.sign(cos), 0.0)
    signs[:, ~usable] = 0.0
    # Majority sign alignment (reference): flip v_j when more clients point against it.
    # ">= 0" counts as positive, as in the reference.
    flip = np.sum(signs >= 0, axis=0) < np.sum(signs < 0, axis=0)
    E[:, flip] *= -1.0
    signs[:, flip] *= -1.0
    return s, E, norms, signs, usable


def _projection_coefficients(G: np.ndarray, kappa: float, rel_tol: float, sign_tol: float):
    """``C`` (``m x m``) with ``r_i = sum_l C_il g_l``; ``None`` when FedLD falls back to the mean."""
    m = G.shape[0]
    k = num_principal_directions(m, kappa)
    if k == 0:
        return None
    s, E, norms, signs, usable = _spectrum(G, rel_tol, sign_tol)
    total = s.sum()
    keep = np.zeros(m, dtype=bool)
    keep[:k] = True
    keep &= usable
    if total <= 0 or not keep.any():
        return np.zeros((m, m))
    weight = np.zeros(m)
    weight[keep] = (s[keep] / total) / np.sqrt(m * s[keep])   # (s_j / sum s) / ||v_j||
    return (norms[:, None] * signs * weight[None, :]) @ E.T


def fedld_client_projections(deltas: Sequence[np.ndarray] | np.ndarray, kappa: float = DEFAULT_KAPPA,
                             rel_tol: float = DEFAULT_REL_TOL,
                             sign_tol: float = DEFAULT_SIGN_TOL) -> np.ndarray:
    """The projected client updates ``r_i`` (``m x d``, float64) of one flattened key.

    When ``k = 0`` the clients are returned unchanged (the mean fallback).
    """
    _check_kappa(kappa)
    G = _stack(list(deltas)).astype(np.float64)
    C = _projection_coefficients(G, kappa, rel_tol, sign_tol)
    return G.copy() if C is None else C @ G


def principal_directions(deltas: Sequence[np.ndarray] | np.ndarray, kappa: float = DEFAULT_KAPPA,
                         rel_tol: float = DEFAULT_REL_TOL) -> tuple[np.ndarray, np.ndarray]:
    """The kept, majority-aligned principal directions ``v_j`` (rows) and their eigenvalues ``s_j``."""
    _check_kappa(kappa)
    G = _stack(list(deltas)).astype(np.float64)
    s, E, _, _, usable = _spectrum(G, rel_tol, DEFAULT_SIGN_TOL)
    k = num_principal_directions(G.shape[0], kappa)
    idx = np.flatnonzero(usable[:k])
    return E[:, idx].T @ G, s[idx]


def _mean(G: np.ndarray) -> np.ndarray:
    return G.astype(np.float64).mean(axis=0)


def _cast(result: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        result = np.rint(result)
    return result.reshape(shape).astype(dtype, copy=False)


def fedld_aggregate_layer(deltas: Sequence[np.ndarray], kappa: float = DEFAULT_KAPPA,
                          first_round: bool = False, rel_tol: float = DEFAULT_REL_TOL,
                          sign_tol: float = DEFAULT_SIGN_TOL, key: object = None) -> np.ndarray:
    """Aggregate the clients' deltas of ONE key; returns the server delta (input shape and dtype).

    Parameters
    ----------
    deltas
        One array per participating client (``w_i - w_g``), all of the same shape.
    kappa
        Fraction of principal directions kept, ``k = floor(m * kappa)`` (paper: 0.8).
    first_round
        True when this key has not been aggregated before: plain unweighted mean.
    rel_tol, sign_tol
        Guards, see the module docstring.
    key
        Only used in error messages.
    """
    _check_kappa(kappa)
    G = _stack(deltas, key)
    shape, dtype = np.shape(deltas[0]), np.asarray(deltas[0]).dtype
    if first_round or G.shape[1] <= 1 or not np.issubdtype(dtype, np.floating):
        return _cast(_mean(G), dtype, shape)
    C = _projection_coefficients(G, kappa, rel_tol, sign_tol)
    if C is None:
        return _cast(_mean(G), dtype, shape)
    coeff = C.mean(axis=0)                                  # delta = mean_i r_i = coeff @ G
    return _cast(coeff @ G.astype(np.float64, copy=False), dtype, shape)


def fedld_aggregate(client_deltas: Sequence[Sequence[np.ndarray]] | Sequence[Mapping[str, np.ndarray]],
                    kappa: float = DEFAULT_KAPPA, seen: Mapping[Any, bool] | None = None,
                    rel_tol: float = DEFAULT_REL_TOL, sign_tol: float = DEFAULT_SIGN_TOL):
    """Aggregate whole models, key by key.

    Parameters
    ----------
    client_deltas
        ``m`` clients, each a list of arrays (keys are the positions 0, 1, ...) or a dict
        ``key -> array`` (all clients with the same keys).
    seen
        ``key -> bool``: keys whose flag is false or missing get the plain mean (first round).

    Returns
    -------
    The server delta in the same structure as one client's entry (list or dict).
    """
    if len(client_deltas) == 0:
        raise AggregationError("FedLD: no client replies to aggregate",
                               "the round needs at least one valid reply")
    seen = seen or {}
    first = client_deltas[0]
    if isinstance(first, Mapping):
        keys = list(first.keys())
        for i, c in enumerate(client_deltas):
            if set(c.keys()) != set(keys):
                raise AggregationError(f"FedLD: client {i} sends keys different from client 0's",
                                       "all clients must return the same state_dict keys")
        return {k: fedld_aggregate_layer([c[k] for c in client_deltas], kappa, not seen.get(k, False),
                                         rel_tol, sign_tol, key=k) for k in keys}
    n_layers = len(first)
    for i, c in enumerate(client_deltas):
        if len(c) != n_layers:
            raise AggregationError(f"FedLD: client {i} sends {len(c)} arrays, client 0 sends {n_layers}",
                                   "all clients must return the same model architecture")
    return [fedld_aggregate_layer([c[j] for c in client_deltas], kappa, not seen.get(j, False),
                                  rel_tol, sign_tol, key=j) for j in range(n_layers)]


def update_alignment(gram: np.ndarray) -> float:
    """Median pairwise cosine of the clients' updates, from their Gram matrix ``G G^T``.

    About 1 for identical updates, 0 for orthogonal ones; a client with a zero update counts as
    orthogonal to every other; 1.0 with fewer than two clients. Invariant to permuting the
    clients and to scaling them.
    """
    gram = np.asarray(gram, dtype=np.float64)
    m = gram.shape[0]
    if m < 2:
        return 1.0
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    iu = np.triu_indices(m, 1)
    denom = np.outer(norms, norms)[iu]
    cos = np.where(denom > 0, gram[iu] / np.where(denom > 0, denom, 1.0), 0.0)
    return float(np.median(np.clip(cos, -1.0, 1.0)))


def guard_weight(alignment: float, min_alignment: float = DEFAULT_MIN_ALIGNMENT) -> float:
    """Weight of the paper's aggregate under the alignment guard: ``clip(alignment / min_alignment, 0, 1)``."""
    if not 0.0 < min_alignment <= 1.0:
        raise ConfigError("strategy.min_alignment", f"must be in (0, 1], got {min_alignment!r}",
                          "the alignment at and above which FedLD's own aggregate is used in full; 0.5 measured")
    return float(np.clip(alignment / min_alignment, 0.0, 1.0))


def _float_keys(first: Any) -> list[Any]:
    items = first.items() if isinstance(first, Mapping) else enumerate(first)
    return [k for k, v in items if np.issubdtype(np.asarray(v).dtype, np.floating)]


def _flat64(deltas: Any, keys: list[Any]) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(deltas[k], dtype=np.float64)) for k in keys]) if keys else np.zeros(0)


class FedLDAggregator:
    """Stateful FedLD server aggregation: one "seen" flag per key across rounds.

    The reference keeps an EMA ``history = 0.99 history + 0.01 delta`` per key and only uses it as a
    "seen and non-zero" flag; this class keeps the flag itself: a key is *seen* once a non-zero
    server delta has been applied to it. ``state_dict`` / ``load_state_dict`` make it resumable.
    """

    def __init__(self, kappa: float = DEFAULT_KAPPA, rel_tol: float = DEFAULT_REL_TOL,
                 sign_tol: float = DEFAULT_SIGN_TOL, guard: str = "none",
                 min_alignment: float = DEFAULT_MIN_ALIGNMENT) -> None:
        _check_kappa(kappa)
        if guard not in GUARDS:
            raise ConfigError("strategy.guard", f"must be one of {', '.join(GUARDS)}, got {guard!r}",
                              "\"none\" is the paper's FedLD; \"alignment\" falls back toward the mean")
        guard_weight(1.0, min_alignment)                # validates min_alignment
        self.kappa = float(kappa)
        self.rel_tol = float(rel_tol)
        self.sign_tol = float(sign_tol)
        self.guard = guard
        self.min_alignment = float(min_alignment)
        self.seen: dict[Any, bool] = {}
        #: the last round's regime: ``alignment``, ``weight`` (of the paper's aggregate),
        #: ``step-cosine`` and ``step-ratio`` (the applied delta against the plain mean)
        self.diagnostics: dict[str, float] = {}

    def aggregate_deltas(self, client_deltas):
        """Server delta for the clients' deltas (list-of-lists or list-of-dicts); updates the flags
        and :attr:`diagnostics`. With ``guard = "none"`` the delta is the paper's, bit for bit."""
        delta = fedld_aggregate(client_deltas, self.kappa, self.seen, self.rel_tol, self.sign_tol)
        keys = _float_keys(client_deltas[0])
        flats = np.stack([_flat64(c, keys) for c in client_deltas])
        alignment = update_alignment(flats @ flats.T)
        weight = 1.0 if self.guard == "none" else guard_weight(alignment, self.min_alignment)
        if weight < 1.0:
            delta = dict(delta) if isinstance(delta, Mapping) else list(delta)
            for k in keys:
                mean = np.stack([np.asarray(c[k]) for c in client_deltas]).astype(np.float64).mean(axis=0)
                mixed = mean if weight == 0.0 else weight * np.asarray(delta[k], dtype=np.float64) + (1 - weight) * mean
                delta[k] = mixed.astype(np.asarray(delta[k]).dtype, copy=False)
        step, mean = _flat64(delta, keys), flats.mean(axis=0)
        norms = float(np.linalg.norm(step)), float(np.linalg.norm(mean))
        self.diagnostics = {"alignment": alignment, "weight": weight,
                            "step-cosine": float(step @ mean / (norms[0] * norms[1])) if min(norms) > 0 else 1.0,
                            "step-ratio": norms[0] / norms[1] if norms[1] > 0 else 1.0}
        items = delta.items() if isinstance(delta, Mapping) else enumerate(delta)
        for k, v in items:
            self.seen[k] = self.seen.get(k, False) or bool(np.any(v != 0))
        return delta

    def aggregate(self, global_weights, client_weights):
        """New global weights ``w_g + delta`` from the clients' full weights (same structure)."""
        if isinstance(global_weights, Mapping):
            deltas = [{k: np.asarray(c[k]) - np.asarray(global_weights[k]) for k in global_weights}
                      for c in client_weights]
            delta = self.aggregate_deltas(deltas)
            return {k: (np.asarray(global_weights[k]) + delta[k]).astype(np.asarray(global_weights[k]).dtype)
                    for k in global_weights}
        deltas = [[np.asarray(c[j]) - np.asarray(w) for j, w in enumerate(global_weights)] for c in client_weights]
        delta = self.aggregate_deltas(deltas)
        return [(np.asarray(w) + d).astype(np.asarray(w).dtype) for w, d in zip(global_weights, delta)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state: ``kappa``, tolerances and the per-key flags (keys as strings)."""
        return {"kappa": self.kappa, "rel_tol": self.rel_tol, "sign_tol": self.sign_tol,
                "guard": self.guard, "min_alignment": self.min_alignment,
                "seen": {str(k): bool(v) for k, v in self.seen.items()},
                "key_is_int": all(isinstance(k, int) for k in self.seen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kappa = float(state["kappa"])
        self.rel_tol = float(state.get("rel_tol", DEFAULT_REL_TOL))
        self.sign_tol = float(state.get("sign_tol", DEFAULT_SIGN_TOL))
        self.guard = str(state.get("guard", "none"))
        self.min_alignment = float(state.get("min_alignment", DEFAULT_MIN_ALIGNMENT))
        as_int = bool(state.get("key_is_int", False))
        self.seen = {(int(k) if as_int else k): bool(v) for k, v in state["seen"].items()}
