"""hessian_top: Lanczos and power iteration on Hessian-vector products against a dense eigendecomposition
(Sagun et al., 2017; spec client-plugins.md §B.16)."""

import pytest
import torch

from fedsim.clients import diagnostics as dg
from fedsim.clients.functional import batch_loss_fn, hvp
from fedsim.clients.plugin_api import make_settings
from fedsim.clients.plugins.hessian_top import HessianTop
from fedsim.errors import ConfigError
from tests.clients.plugins.probe_helpers import one_thread  # noqa: F401 - fixture
from tests.clients.plugins.probe_helpers import dense_hessian, local_round, params, small_problem, weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _top_by_magnitude(h: torch.Tensor, k: int) -> list[float]:
    vals = torch.linalg.eigvalsh(h)
    return sorted(vals.tolist(), key=abs, reverse=True)[:k]


def test_lanczos_top_eigenvalues_match_a_dense_eigendecomposition():
    model, x, y = small_problem()
    exact = _top_by_magnitude(dense_hessian(model, x, y), 3)
    got = dg.hessian_top_eigenvalues(batch_loss_fn(model, x, y), params(model), 3, torch.Generator().manual_seed(0))
    assert len(got) == 3
    for g, e in zip(got, exact):
        assert g == pytest.approx(e, rel=1e-3)


def test_power_iteration_top_eigenvalue_matches_a_dense_eigendecomposition():
    model, x, y = small_problem()
    exact = _top_by_magnitude(dense_hessian(model, x, y), 1)
    got = dg.hessian_top_eigenvalues(batch_loss_fn(model, x, y), params(model), 1, torch.Generator().manual_seed(0),
                                     method="power", max_iter=5000, tol=1e-10)
    assert got[0] == pytest.approx(exact[0], rel=1e-3)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_both_methods_are_exact_on_a_quadratic_with_known_spectrum(method):
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    spectrum = torch.tensor([6.0, -4.0, 2.0, 0.5, 0.3, 0.2, 0.1, 0.05], dtype=torch.float64)
    a = q @ torch.diag(spectrum) @ q.T
    got = dg.hessian_top_eigenvalues(lambda p: 0.5 * p["w"] @ a @ p["w"], {"w": torch.ones(8, dtype=torch.float64)},
                                     3, gen, method=method, max_iter=500, tol=1e-12)
    assert got == pytest.approx([6.0, -4.0, 2.0], rel=1e-6)


def test_the_reused_graph_products_equal_forward_over_reverse_products():
    model, x, y = small_problem()
    p = params(model)
    f = batch_loss_fn(model, x, y)
    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(2)) for k, t in p.items()}
    product = dg.hvp_operator(f, p)
    reference = hvp(f, p, v)
    for _ in range(2):  # the graph is reused
        got = product(v)
        for k in p:
            torch.testing.assert_close(got[k], reference[k], rtol=1e-4, atol=1e-6)


def test_k_must_leave_room_in_the_parameter_space():
    with pytest.raises(ValueError, match="k must be in"):
        dg.hessian_top_eigenvalues(lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(3)}, 3, torch.Generator())


def test_the_plugin_reports_eigenvalues_every_k_rounds_without_changing_training():
    plain, _ = local_round([])
    probed, res = local_round([HessianTop(HessianTop.Settings(k=2, every=2))], round=1)
    assert weights(plain) == weights(probed)
    assert res.metrics["hessian_top/converged"] == 2.0
    assert abs(res.metrics["hessian_top/eig1"]) >= abs(res.metrics["hessian_top/eig2"]) > 0
    _, skipped = local_round([HessianTop(HessianTop.Settings(k=2, every=2))], round=2)
    assert not any(k.startswith("hessian_top/") for k in skipped.metrics)


def test_an_unconverged_power_iteration_reports_fewer_eigenvalues():
    _, res = local_round([HessianTop(HessianTop.Settings(k=2, method="power", max_iter=1))])
    assert res.metrics["hessian_top/converged"] == 0.0 and "hessian_top/eig1" not in res.metrics


@pytest.mark.parametrize("key, value", [("k", 0), ("method", "arnoldi"), ("tol", 0.0), ("every", 0), ("max_iter", 0)])
def test_bad_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"client.hessian_top.{key}"):
        make_settings(HessianTop, {key: value})


def test_more_eigenvalues_than_the_model_has_are_refused_before_the_run():
    from tests.conftest import tiny

    with pytest.raises(ConfigError, match="client.hessian_top.k"):
        tiny(['client.plugins=["hessian_top"]', "client.hessian_top.k=5000"])  # the tiny MLP has 1210
