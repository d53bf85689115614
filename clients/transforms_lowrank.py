"""Low-rank / subspace Adam transforms: ``frugal`` and ``dct_lowrank``.

* **FRUGAL** — Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
  Scalable Training", ICML 2025 (spec ``client-plugins.md`` §B.7). The gradient of
  a matrix parameter is split as ``g = P Pᵀ g + r``: the part in a subspace goes through state-full
  Adam (moments only in the subspace), the residual ``r`` through a state-free rule (signSGD by
  default, or SGD), ``d = P·Adam(Pᵀ g) + free_scale · sign(r)``. Subspaces: ``svd`` (GaLore-style top
  singular vectors), ``dct`` (the DCT columns most aligned with the gradient, :mod:`fedsim.clients.dct`)
  or ``blockwise`` (BAdam-like: a cyclic window of whole matrices in Adam, the others state-free).
  Parameters that are not matrices (biases, norms) always get full Adam, as in the paper.
* **DCT low-rank Adam** — Modoranu et al., "SVD-Free Low-Rank Adaptive Gradient Optimization", 2025
  (arXiv 2505.17967; §B.8): the same Adam-in-a-subspace with the DCT projection, the
  residual dropped (GaLore-style, ``d = scale · P·Adam(Pᵀ g)``), only the column indices stored.

The subspace is chosen again every ``update_gap`` steps (counted over the whole run: the counter
persists across rounds with the client's state); at each switch the subspace moments and the Adam
step counter of the subspace restart (moments of coordinates that leave the subspace are discarded,
as the FRUGAL paper does). A matrix ``G`` (conv kernels are seen as ``out × rest``) is projected on
its smaller side: ``M = G`` if it has at least as many rows as columns, else ``M = Gᵀ``; the basis
``B`` (``k × r``, ``k`` the smaller side, ``r = round(density · k)``) multiplies ``M`` from the right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.clients import dct
from fedsim.clients.transforms import GradTransform, Params, State, adam_direction, register_transform

__all__ = ["Frugal", "DCTLowRank", "SubspaceAdam", "matrix_view", "from_matrix_view", "svd_basis"]

PROJECTIONS = ("svd", "dct", "blockwise")
FREE_RULES = ("sign", "sgd", "none")


def matrix_view(g: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(M, transposed)``: ``g`` as a matrix with at least as many rows as columns."""
    m = g.reshape(g.shape[0], -1)
    return (m.T, True) if m.shape[0] < m.shape[1] else (m, False)


def from_matrix_view(m: torch.Tensor, transposed: bool, shape: torch.Size) -> torch.Tensor:
    return (m.T if transposed else m).reshape(shape)


def svd_basis(m: torch.Tensor, r: int) -> torch.Tensor:
    """The top-``r`` right singular vectors of ``m`` (``k × r``), GaLore's projection."""
    return torch.linalg.svd(m, full_matrices=False).Vh[:r].T.contiguous()


@dataclass(frozen=True)
class _SubspaceSettings:
    density: float = 0.25
    update_gap: int = 200
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {self.density}")
        if self.update_gap < 1:
            raise ValueError(f"update_gap must be >= 1, got {self.update_gap}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


class SubspaceAdam(GradTransform):
    """Adam in a periodically re-chosen subspace of every matrix parameter, a state-free rule on the rest.

    Subclasses fix ``projection``, ``free_rule``, ``free_scale`` and ``scale`` from their settings.
    """

    projection = "svd"
    free_rule = "sign"
    free_scale = 1.0
    scale = 1.0

    def _rank(self, k: int) -> int:
        return int(round(self.settings.density * k))

    def init(self, params: Params) -> State:
        dense = {k: v for k, v in params.items() if v.ndim < 2}
        return {"count": torch.zeros((), dtype=torch.int64), "inner": torch.zeros((), dtype=torch.int64),
                "m": {}, "v": {}, "basis": {}, "active": torch.zeros(0, dtype=torch.int64),
                "matrix_entries": torch.tensor(sum(int(v.numel()) for v in params.values() if v.ndim >= 2)),
                "dense_m": {k: torch.zeros_like(v) for k, v in dense.items()},
                "dense_v": {k: torch.zeros_like(v) for k, v in dense.items()}}

    # -- choosing the subspace ------------------------------------------------------------------------
    def _refresh(self, grads: Params, params: Params, state: State, count: int) -> None:
        matrices = [k for k, v in params.items() if v.ndim >= 2]
        state["m"], state["v"], state["basis"] = {}, {}, {}
        state["inner"] = torch.zeros((), dtype=torch.int64)
        if self.projection == "blockwise":
            n, width = len(matrices), int(round(self.settings.density * len(matrices)))
            start = (count // self.settings.update_gap) * width
            state["active"] = torch.tensor(sorted({(start + j) % n for j in range(width)}) if n else [],
                                           dtype=torch.int64)
            for i in state["active"].tolist():
                k = matrices[i]
                state["m"][k], state["v"][k] = torch.zeros_like(params[k]), torch.zeros_like(params[k])
            return
        for k in matrices:
            if k not in grads:
                continue
            m, _ = matrix_view(grads[k])
            r = self._rank(int(m.shape[1]))
            state["basis"][k] = svd_basis(m, r) if self.projection == "svd" else dct.select_columns(m, r)
            state["m"][k] = torch.zeros(m.shape[0], r, dtype=m.dtype, device=m.device)
            state["v"][k] = torch.zeros_like(state["m"][k])

    def _basis(self, k: str, m: torch.Tensor, state: State) -> torch.Tensor:
        b = state["basis"][k]
        return b if self.projection == "svd" else dct.basis(int(m.shape[1]), b, m.dtype, m.device)

    def _free(self, residual: torch.Tensor) -> torch.Tensor:
        if self.free_rule == "sign":
            return torch.sign(residual) * self.free_scale
        if self.free_rule == "sgd":
            return residual * self.free_scale
        return torch.zeros_like(residual)

    # -- one step -------------------------------------------------------------------------------------
    def update(self, grads: Params, state: State, params: Params, **extra) -> tuple[Params, State]:
        s = self.settings
        state = dict(state)
        count = int(state["count"])
        if count % s.update_gap == 0:
            self._refresh(grads, params, state, count)
        inner = int(state["inner"]) + 1
        m_all, v_all = dict(state["m"]), dict(state["v"])
        dm, dv = dict(state["dense_m"]), dict(state["dense_v"])
        matrices = [k for k, v in params.items() if v.ndim >= 2]
        active = {matrices[i] for i in state["active"].tolist()} if self.projection == "blockwise" else set()
        out: Params = {}
        for k, g in grads.items():
            if g.ndim < 2:  # not a matrix: full Adam, its own step counter (never reset)
                out[k], dm[k], dv[k] = adam_direction(g, dm[k], dv[k], count + 1, s.b1, s.b2, s.eps)
            elif self.projection == "blockwise":
                if k in active:
                    a, m_all[k], v_all[k] = adam_direction(g, m_all[k], v_all[k], inner, s.b1, s.b2, s.eps)
                    out[k] = self.scale * a
                else:
                    out[k] = self._free(g)
            elif k not in state["basis"]:  # no gradient when the subspace was chosen
                out[k] = self._free(g)
            else:
                m, transposed = matrix_view(g)
                b = self._basis(k, m, state)
                low = m @ b
                a, m_all[k], v_all[k] = adam_direction(low, m_all[k], v_all[k], inner, s.b1, s.b2, s.eps)
                d = self.scale * (a @ b.T) + self._free(m - low @ b.T)
                out[k] = from_matrix_view(d, transposed, g.shape)
        state.update({"count": torch.tensor(count + 1, dtype=torch.int64),
                      "inner": torch.tensor(inner, dtype=torch.int64),
                      "m": m_all, "v": v_all, "dense_m": dm, "dense_v": dv})
        return out, state

    def metrics(self, state: State) -> dict[str, float]:
        """``moment_fraction``: moment entries of matrix parameters over their size (≈ density)."""
        held = sum(int(t.numel()) for t in state["m"].values())
        return {"moment_fraction": held / max(int(state["matrix_entries"]), 1)}


@register_transform
class Frugal(SubspaceAdam):
    """FRUGAL: state-full Adam in a subspace, signSGD (or SGD) on the residual (see the module docstring)."""

    name = "frugal"

    @dataclass(frozen=True)
    class Settings(_SubspaceSettings):
        projection: str = "svd"
        free_rule: str = "sign"
        free_scale: float = 1.0

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.projection not in PROJECTIONS:
                raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
            if self.free_rule not in FREE_RULES:
                raise ValueError(f"free_rule must be one of {', '.join(FREE_RULES)}, got {self.free_rule!r}")
            if not self.free_scale >= 0:
                raise ValueError(f"free_scale must be >= 0, got {self.free_scale}")

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.projection = self.settings.projection
        self.free_rule = self.settings.free_rule
        self.free_scale = self.settings.free_scale


@register_transform
class DCTLowRank(SubspaceAdam):
    """DCT low-rank Adam: moments on the ``r`` DCT columns best aligned with the gradient, the
    residual dropped, ``scale`` on the mapped-back update (GaLore's α)."""

    name = "dct_lowrank"
    projection = "dct"
    free_rule = "none"

    @dataclass(frozen=True)
    class Settings(_SubspaceSettings):
        scale: float = 1.0

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.scale > 0:
                raise ValueError(f"scale must be > 0, got {self.scale}")

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.scale = self.settings.scale
