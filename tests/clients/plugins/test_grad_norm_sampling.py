"""PA&DA data sampling (spec §B.21): Σp = 1, p_i ≥ (1−τ)/N, τ = 0 uniform, the proxy is the autograd
‖∂ℓ/∂z‖, importance re-weighting is unbiased and reaches the loss, the record persists."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.clients.plugin_api import ClientPlugin, Event, PluginStack
from fedsim.clients.plugins.data_diet import el2n
from fedsim.clients.plugins.grad_norm_sampling import (
    GradNormSampling,
    importance_weights,
    sampling_probabilities,
)
from fedsim.clients.trainer import train_local
from fedsim.models import build_model
from tests.conftest import tiny


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_probabilities_sum_to_one_with_the_uniform_floor(n, tau, seed):
    q = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q[::2] = 0.0
    p = sampling_probabilities(q, tau)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (p >= (1 - tau) / n - 1e-15).all()
    if float(q.sum()) > 0:
        assert torch.allclose(p, tau * q / q.sum() + (1 - tau) / n, rtol=1e-12)
    assert torch.allclose(sampling_probabilities(q, 0.0), torch.full((n,), 1.0 / n, dtype=torch.float64))


def test_proxy_equals_the_autograd_logit_gradient_norm():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(16, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y = torch.randint(0, 7, (16,), generator=g)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y, reduction="sum"), z)
    assert torch.allclose(el2n(z, y), grad.norm(dim=1), rtol=1e-12)


def test_importance_weighting_is_unbiased():
    g = torch.Generator().manual_seed(1)
    n, d = 30, 5
    grads = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = sampling_probabilities(torch.rand(n, generator=g, dtype=torch.float64), 0.8)
    w = importance_weights(p)
    full = grads.mean(0)
    assert torch.allclose((p[:, None] * w[:, None] * grads).sum(0), full, rtol=1e-12)  # the exact expectation
    draws = torch.multinomial(p, 400_000, replacement=True, generator=g)
    mc = (w[draws, None] * grads[draws]).mean(0)
    assert torch.allclose(mc, full, atol=0.02)
    unweighted = grads[draws].mean(0)
    assert not torch.allclose(unweighted, full, atol=0.05)  # without the weights the mean is biased


class LossSpy(ClientPlugin):
    name = "lossspy"
    events = frozenset({Event.LOSS, Event.SAMPLER})

    def __init__(self, settings=None):
        super().__init__(settings)
        self.checked = 0
        self.orders: list[torch.Tensor] = []

    def on(self, event, state):
        if event is Event.SAMPLER:
            self.orders.append(state.order.clone())
            return
        plugin = self.settings
        bx, by = state.batch
        per = torch.nn.functional.cross_entropy(state.outputs, by, reduction="none")
        if plugin._p is not None:
            w = 1.0 / (state.x.shape[0] * plugin._p[state.batch_indices])
            assert torch.allclose(state.loss_terms["ce"], (w.float() * per).mean(), rtol=1e-6)
            self.checked += 1
        else:
            assert torch.equal(state.loss_terms["ce"], per.mean()) or \
                torch.allclose(state.loss_terms["ce"], per.mean(), rtol=1e-6)


def _round(plugin, spy, round, progress, x, y, model):
    s = tiny()
    cfg = s.client.model_copy(update={"batch_size": 8, "epochs": 1, "max_steps": 0})
    return train_local(model, x, y, cfg, PluginStack([plugin, spy]), round=round, client_id=0, seed=0,
                       rng=torch.Generator().manual_seed(round), progress=progress, progress_span=0.5)


def test_the_loop_records_the_proxy_then_samples_and_reweights_the_loss():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 64, generator=g), torch.randint(0, 10, (40,), generator=g)
    model = build_model(tiny().model, (64,), 10, 0)
    plugin = GradNormSampling(GradNormSampling.Settings(tau=1.0, ramp_end=0.5, reweight=True))
    spy = LossSpy(plugin)
    _round(plugin, spy, 1, 0.0, x, y, model)
    assert spy.checked == 0 and sorted(spy.orders[0].tolist()) == list(range(40))  # nothing recorded yet: plain
    q = plugin.state_dict()["proxy"]
    assert (q > 0).all() and (q <= 2 ** 0.5).all()  # every example seen once in the epoch
    restored = GradNormSampling(plugin.settings)
    restored.load_state_dict(plugin.state_dict())
    spy = LossSpy(restored)
    res = _round(restored, spy, 2, 0.5, x, y, model)
    assert spy.checked == 5 and res.metrics["grad_norm_sampling/tau"] == 1.0
    p = sampling_probabilities(torch.as_tensor(q), 1.0)
    rng = torch.Generator().manual_seed(2)
    torch.randperm(40, generator=rng)  # the loop's own order comes first
    expect = torch.multinomial(p, 40, replacement=True, generator=rng)
    assert torch.equal(spy.orders[0], expect)  # drawn with the training RNG from p
    assert model.training and restored._base_loss is None


def test_tau_ramps_on_global_progress_and_tau_zero_is_the_plain_order():
    plugin = GradNormSampling(GradNormSampling.Settings(tau=0.8, ramp_end=0.5))
    assert plugin.tau_at(0.0) == 0.0 and plugin.tau_at(0.25) == pytest.approx(0.4) and plugin.tau_at(0.9) == 0.8
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 64, generator=g), torch.randint(0, 10, (24,), generator=g)
    models = []
    for stack in ([], [GradNormSampling(GradNormSampling.Settings.neutral())]):
        model = build_model(tiny().model, (64,), 10, 0)
        s = tiny()
        train_local(model, x, y, s.client.model_copy(update={"batch_size": 8}), PluginStack(stack), round=1,
                    client_id=0, seed=0, rng=torch.Generator().manual_seed(1))
        models.append(model)
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))
