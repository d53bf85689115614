"""cockpit: α, GSNR, TIC and the Hutchinson trace against direct computations (Schneider et al., NeurIPS
2021; spec client-plugins.md §B.14)."""

import numpy as np
import pytest
import torch

from fedsim.clients import diagnostics as dg
from fedsim.clients.plugin_api import make_settings
from fedsim.clients.plugins.cockpit import Cockpit, cockpit_metrics
from fedsim.errors import ConfigError
from tests.clients.plugins.probe_helpers import (one_thread,  # noqa: F401 - fixture
                                                 dense_hessian, local_round, loop_per_example_grads, params,
                                                 small_problem, weights)

pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(samples=16, lr=0.1, global_params=None, seed=0):
    model, x, y = small_problem()
    return model, x, y, cockpit_metrics(model, x, y, lr, torch.Generator().manual_seed(seed), samples, global_params)


def test_gsnr_matches_per_example_gradients_computed_directly():
    model, x, y, m = _metrics()
    g = loop_per_example_grads(model, x, y).numpy()
    mean, var = g.mean(0), g.var(0)  # population variance over the examples, per coordinate
    assert m["gsnr"] == pytest.approx(float(np.mean(mean ** 2 / (var + 1e-5))), rel=1e-4)
    # Cockpit's own form from BackPACK's scaled individual gradients g_i / B: ḡ² / (B Σ (g_i/B)² − ḡ² + ε)
    b = g.shape[0]
    cockpit_form = mean ** 2 / (b * ((g / b) ** 2).sum(0) - mean ** 2 + 1e-5)
    assert m["gsnr"] == pytest.approx(float(np.mean(cockpit_form)), rel=1e-4)
    assert m["grad_norm"] == pytest.approx(float(np.linalg.norm(mean)), rel=1e-5)


def test_tic_matches_per_example_gradients_and_the_hessian_trace():
    model, x, y, m = _metrics(samples=8)
    g = loop_per_example_grads(model, x, y)
    mean_sq_norm = float((g ** 2).sum(1).mean())
    assert m["tic"] == pytest.approx(mean_sq_norm / (m["hess_trace"] + 1e-7), rel=1e-4)
    exact = float(torch.trace(dense_hessian(model, x, y)))
    assert dg.tic_trace(g, exact) == pytest.approx(mean_sq_norm / exact, rel=1e-6)


def test_hutchinson_trace_is_within_three_standard_errors_of_the_exact_trace():
    model, x, y, m = _metrics(samples=64)
    exact = float(torch.trace(dense_hessian(model, x, y)))
    assert m["hess_trace_se"] > 0
    assert abs(m["hess_trace"] - exact) <= 3 * m["hess_trace_se"], (m["hess_trace"], exact, m["hess_trace_se"])


def test_the_hutchinson_standard_error_is_the_spread_of_the_quadratic_forms():
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0])) + 0.5  # off-diagonal entries make vᵀAv vary
    mean, se = dg.hutchinson_trace(lambda p: 0.5 * p["w"] @ a @ p["w"], {"w": torch.zeros(3)}, 400,
                                   torch.Generator().manual_seed(0))
    off = (a - torch.diag(torch.diag(a))) ** 2
    assert se == pytest.approx(float(torch.sqrt(2 * off.sum() / 400)), rel=0.2)  # Var(vᵀAv) = 2 Σ_{i≠j} a_ij²
    assert abs(mean - float(torch.trace(a))) <= 3 * se


@pytest.mark.parametrize("eta_h, alpha", [(1.0, 0.0), (2.0, 1.0), (0.5, -0.5), (3.0, 2.0)])
def test_alpha_on_a_quadratic_with_gradient_descent(eta_h, alpha):
    h, theta = 4.0, torch.tensor([1.5], dtype=torch.float64)
    losses = lambda p: 0.5 * h * p["w"] ** 2  # noqa: E731 - one example
    step = {"w": -(eta_h / h) * h * theta}
    assert dg.step_alpha(losses, {"w": theta}, step) == pytest.approx(alpha, abs=1e-9)


def test_alpha_with_noisy_examples_fits_the_mean_quadratic():
    h, centres = 2.0, torch.tensor([0.3, -1.0, 0.8, 2.0], dtype=torch.float64)
    losses = lambda p: 0.5 * h * (p["w"] - centres) ** 2  # noqa: E731 - mean minimum at centres.mean()
    theta = torch.tensor([3.0], dtype=torch.float64)
    step = {"w": -(1.0 / h) * h * (theta - centres.mean())}  # Newton step lands on the mean minimum
    assert dg.step_alpha(losses, {"w": theta}, step) == pytest.approx(0.0, abs=1e-9)
    assert dg.step_alpha(losses, {"w": theta}, {"w": 2 * step["w"]}) == pytest.approx(1.0, abs=1e-9)


def test_alpha_conventions_for_concave_and_empty_steps():
    assert dg.step_alpha(lambda p: -(p["w"] ** 2), {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}) == -1.0
    assert dg.step_alpha(lambda p: p["w"] ** 2, {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.0])}) == -1.0
    mu = dg.fit_quadratic(2.0, [1.0, 5.0], [0.0, 4.0], [0.3, 2.0], [1.0, 0.1])  # q(s) = 1 + s², any weights
    assert mu == pytest.approx([1.0, 0.0, 1.0])


def test_the_plugin_alpha_is_the_alpha_of_a_gradient_step_at_the_given_rate():
    model, x, y, m = _metrics(lr=0.7)
    p = params(model)
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    step = {k: -0.7 * gk for k, gk in zip(p, g)}
    assert m["alpha"] == pytest.approx(dg.step_alpha(dg.individual_losses_fn(model, x, y), p, step), abs=1e-5)


def test_distance_is_the_norm_of_the_change_from_the_global_model():
    model, _, _ = small_problem()
    moved = {k: v + 0.25 for k, v in params(model).items()}
    *_, m = _metrics(global_params=moved)
    assert m["distance"] == pytest.approx(0.25 * np.sqrt(sum(v.numel() for v in moved.values())), rel=1e-5)


def test_the_plugin_probes_a_fixed_batch_every_k_rounds_without_changing_training():
    plain, _ = local_round([], round=3)
    probed, res = local_round([Cockpit(Cockpit.Settings(every=2, hutchinson_samples=4))], round=3)
    assert weights(plain) == weights(probed)
    keys = {"loss", "grad_norm", "distance", "alpha", "gsnr", "tic", "hess_trace", "hess_trace_se"}
    assert {k for k in res.metrics if k.startswith("cockpit/")} == {f"cockpit/{k}" for k in keys}
    assert res.metrics["cockpit/distance"] > 0
    _, skipped = local_round([Cockpit(Cockpit.Settings(every=2))], round=2)
    assert not any(k.startswith("cockpit/") for k in skipped.metrics)
    assert torch.equal(dg.probe_indices(40, 8, 0, 1), dg.probe_indices(40, 8, 0, 1))
    assert not torch.equal(dg.probe_indices(40, 8, 0, 1), dg.probe_indices(40, 8, 0, 2))
    assert [dg.is_due(3, r) for r in range(1, 8)] == [True, False, False, True, False, False, True]


@pytest.mark.parametrize("key, value", [("every", 0), ("probe_size", 1), ("hutchinson_samples", 1)])
def test_bad_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"client.cockpit.{key}"):
        make_settings(Cockpit, {key: value})
