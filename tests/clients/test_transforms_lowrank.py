"""FRUGAL and DCT low-rank Adam (clients/transforms_lowrank.py) and the DCT math (clients/dct.py),
each checked against a direct computation."""

import pytest
import torch

from fedsim.clients import dct
from fedsim.clients.transforms import Adam, adam_direction
from fedsim.clients.transforms_lowrank import DCTLowRank, Frugal, matrix_view, svd_basis


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(6, 10, generator=gen), "a.bias": torch.randn(6, generator=gen),
            "b.weight": torch.randn(8, 4, generator=gen), "c.weight": torch.randn(3, 2, 2, generator=gen)}


def _grads(step):
    return _params(50 + step)


def _run(transform, steps=4):
    p = _params()
    state = transform.init(p)
    outs = []
    for step in range(steps):
        d, state = transform.update(_grads(step), state, p)
        outs.append(d)
    return outs, state


def test_dct_basis_is_orthonormal():
    for n in (1, 2, 7, 16):
        q = dct.dct_matrix(n, torch.float64)
        torch.testing.assert_close(q.T @ q, torch.eye(n, dtype=torch.float64))
    # column k is the k-th cosine (DCT-II)
    q = dct.dct_matrix(5, torch.float64)
    i = torch.arange(5, dtype=torch.float64)
    torch.testing.assert_close(q[:, 2], torch.cos(torch.pi * (2 * i + 1) * 2 / 10) * (2 / 5) ** 0.5)


def test_dct_selection_is_top_l1_and_reconstruction_is_exact_on_selected_columns():
    gen = torch.Generator().manual_seed(1)
    n, idx = 12, torch.tensor([1, 4, 9])
    coeff = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    g = coeff @ dct.dct_matrix(n, torch.float64)[:, idx].T  # supported on columns 1, 4, 9
    chosen = dct.select_columns(g, 3)
    assert chosen.tolist() == [1, 4, 9]
    torch.testing.assert_close(dct.project(g, chosen), coeff)
    torch.testing.assert_close(dct.reconstruct(dct.project(g, chosen), chosen, n), g)
    # a generic matrix: the selection is the r largest column l1 norms of g Q, computed directly
    h = torch.randn(5, n, generator=gen, dtype=torch.float64)
    norms = (h @ dct.dct_matrix(n, torch.float64)).abs().sum(0)
    assert set(dct.select_columns(h, 4).tolist()) == set(torch.topk(norms, 4).indices.tolist())
    # never better than the rank-r SVD optimum (Eckart-Young)
    r = 4
    err_dct = torch.linalg.norm(h - dct.reconstruct(dct.project(h, dct.select_columns(h, r)), dct.select_columns(h, r), n))
    s = torch.linalg.svdvals(h)
    assert float(err_dct) >= float(torch.sqrt((s[r:] ** 2).sum())) - 1e-9
    with pytest.raises(ValueError):
        dct.select_columns(h, n + 1)


def test_frugal_blockwise_full_density_equals_adam():
    frugal = Frugal(Frugal.Settings(projection="blockwise", density=1.0, update_gap=100))
    adam = Adam()
    got, _ = _run(frugal)
    ref, _ = _run(adam)
    for a, b in zip(got, ref):
        for k in a:
            torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("projection", ["svd", "dct", "blockwise"])
def test_frugal_zero_density_is_signsgd_on_matrices_and_adam_elsewhere(projection):
    got, state = _run(Frugal(Frugal.Settings(projection=projection, density=0.0, free_scale=0.5)))
    ref, _ = _run(Adam())
    for step, d in enumerate(got):
        g = _grads(step)
        for k in ("a.weight", "b.weight", "c.weight"):
            torch.testing.assert_close(d[k], 0.5 * torch.sign(g[k]))
        torch.testing.assert_close(d["a.bias"], ref[step]["a.bias"])
    assert Frugal().metrics(state)["moment_fraction"] == 0.0


def test_frugal_svd_step_is_adam_in_the_subspace_plus_sign_of_the_residual_and_has_rank_above_r():
    frugal = Frugal(Frugal.Settings(projection="svd", density=0.5, update_gap=100))
    p, g = _params(), _grads(0)
    d, state = frugal.update(g, frugal.init(p), p)
    m, transposed = matrix_view(g["a.weight"])  # 6 x 10 -> its transpose, 10 x 6: k = 6, r = 3
    assert transposed and m.shape == (10, 6)
    b = svd_basis(m, 3)
    low = m @ b
    a, _, _ = adam_direction(low, torch.zeros_like(low), torch.zeros_like(low), 1, 0.9, 0.999, 1e-8)
    expected = (a @ b.T + torch.sign(m - low @ b.T)).T
    torch.testing.assert_close(d["a.weight"], expected)
    assert int(torch.linalg.matrix_rank(d["a.weight"])) > 3
    # moments live in the subspace: 10*3 + 8*2 + 3*1 (c.weight seen as 3 x 4 -> 4 x 3, r = round(1.5) = 2)
    held = sum(v.numel() for v in state["m"].values())
    assert held == 10 * 3 + 8 * 2 + 4 * 2
    assert abs(frugal.metrics(state)["moment_fraction"] - held / (60 + 32 + 12)) < 1e-12


def test_frugal_resets_the_subspace_state_at_each_switch():
    frugal = Frugal(Frugal.Settings(projection="svd", density=0.5, update_gap=2))
    p = _params()
    state = frugal.init(p)
    seen = []
    for step in range(5):
        _, state = frugal.update(_grads(step), state, p)
        seen.append((int(state["count"]), int(state["inner"])))
        if step == 2:  # the third step opens a new subspace: moments restart from this gradient alone
            m, _ = matrix_view(_grads(2)["b.weight"])
            b = svd_basis(m, 2)
            torch.testing.assert_close(state["basis"]["b.weight"], b)
            torch.testing.assert_close(state["m"]["b.weight"], 0.1 * (m @ b))
    assert seen == [(1, 1), (2, 2), (3, 1), (4, 2), (5, 1)]


def test_blockwise_window_cycles_over_the_matrices():
    frugal = Frugal(Frugal.Settings(projection="blockwise", density=0.34, update_gap=1))  # 1 of 3 matrices
    p = _params()
    state = frugal.init(p)
    active = []
    for step in range(4):
        _, state = frugal.update(_grads(step), state, p)
        active.append(state["active"].tolist())
    assert active == [[0], [1], [2], [0]]


def test_dct_lowrank_step_is_adam_on_the_selected_dct_columns():
    t = DCTLowRank(DCTLowRank.Settings(density=0.5, scale=0.25, update_gap=10))
    p, g = _params(), _grads(0)
    d, state = t.update(g, t.init(p), p)
    m, transposed = matrix_view(g["a.weight"])
    idx = dct.select_columns(m, 3)
    assert torch.equal(state["basis"]["a.weight"], idx) and state["basis"]["a.weight"].dtype == torch.int64
    b = dct.basis(6, idx)
    low = m @ b
    a, _, _ = adam_direction(low, torch.zeros_like(low), torch.zeros_like(low), 1, 0.9, 0.999, 1e-8)
    torch.testing.assert_close(d["a.weight"], (0.25 * a @ b.T).T)
    assert int(torch.linalg.matrix_rank(d["a.weight"])) <= 3  # the residual is dropped
