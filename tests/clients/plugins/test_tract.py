"""TrAct (spec §B.9): the two branches agree, λ·grad′ → grad as λ → ∞, whitened inputs give grad/(1+λ),
the forward pass and the bias/input gradients are unchanged, and the plugin swaps only the first layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedsim.clients.plugin_api import Event
from fedsim.clients.plugins.tract import TrAct, TrActConv2d, TrActLinear, tract_weight_grad
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.clients.plugins.loop_helpers import Recorder, data, run_round, weights
from tests.conftest import tiny

DT = torch.float64


def _ga(n_rows, n_in, out=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, out, generator=gen, dtype=DT), torch.randn(n_rows, n_in, generator=gen, dtype=DT)


@pytest.mark.parametrize("shape", [(5, 12), (20, 6)])
def test_woodbury_and_direct_branches_agree_and_match_the_ridge_formula(shape):
    g, a = _ga(*shape)
    direct, woodbury = tract_weight_grad(g, a, 0.1, woodbury=False), tract_weight_grad(g, a, 0.1, woodbury=True)
    ref = g.T @ a @ torch.linalg.inv(a.T @ a / shape[0] + 0.1 * torch.eye(shape[1], dtype=DT))
    torch.testing.assert_close(direct, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(woodbury, ref, rtol=1e-7, atol=1e-9)


def test_lambda_times_grad_tends_to_the_plain_gradient():
    g, a = _ga(8, 5)
    plain = g.T @ a
    errs = [float((lam * tract_weight_grad(g, a, lam) - plain).norm() / plain.norm()) for lam in (1e1, 1e3, 1e5)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4


def test_whitened_inputs_give_grad_over_one_plus_lambda():
    q, _ = torch.linalg.qr(torch.randn(40, 6, generator=torch.Generator().manual_seed(3), dtype=DT))
    a = q * (40 ** 0.5)  # AᵀA/N = I
    g, _ = _ga(40, 6)
    torch.testing.assert_close(tract_weight_grad(g, a, 0.3), g.T @ a / 1.3)


def test_linear_forward_bias_and_input_grads_unchanged_weight_grad_is_tract():
    torch.manual_seed(0)
    lin = nn.Linear(7, 4).double()
    tr = TrActLinear(copy.deepcopy(lin), 0.2)
    x1 = torch.randn(10, 7, dtype=DT, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out1, out2 = lin(x1), tr(x2)
    assert torch.equal(out1, out2)
    w = torch.randn(10, 4, dtype=DT)
    (out1 * w).sum().backward()
    (out2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(lin.bias.grad, tr.bias.grad)
    torch.testing.assert_close(tr.weight.grad, tract_weight_grad(w, x1.detach(), 0.2))


def test_conv_weight_grad_is_tract_on_unfolded_patches():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    tr = TrActConv2d(copy.deepcopy(conv), 0.5)
    x = torch.randn(4, 2, 6, 5, dtype=DT)
    assert torch.equal(conv(x), tr(x))
    w = torch.randn_like(conv(x))
    xr = x.clone().requires_grad_(True)
    (conv(xr) * w).sum().backward()
    xt = x.clone().requires_grad_(True)
    (tr(xt) * w).sum().backward()
    torch.testing.assert_close(xr.grad, xt.grad)
    torch.testing.assert_close(conv.bias.grad, tr.bias.grad)
    patches = nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    g = w.flatten(2).transpose(1, 2).reshape(-1, 3)
    torch.testing.assert_close(tr.weight.grad, tract_weight_grad(g, patches, 0.5).reshape(3, 2, 3, 3))


def test_plugin_changes_only_the_first_layer_and_restores_the_model():
    seen = {}

    def look(event, state):
        seen[event] = [type(m).__name__ for m in state.model if not isinstance(m, (nn.Flatten, nn.ReLU))]

    rec = Recorder(look, [Event.AFTER_STEP])
    plain, _, _ = run_round([])
    model, _, _ = run_round([TrAct(TrAct.Settings(lam=0.1)), rec])
    assert seen[Event.AFTER_STEP] == ["TrActLinear", "Linear"]
    assert [type(m).__name__ for m in model][1] == "Linear"  # put back at ROUND_END
    p, t = dict(plain.named_parameters()), dict(model.named_parameters())
    assert not torch.equal(p["1.weight"], t["1.weight"])
    neutral, _, _ = run_round([TrAct(TrAct.Settings.neutral())])
    assert weights(neutral) == weights(plain)


def test_plugin_step_equals_sgd_with_the_tract_gradient():
    x, y = data(n=16)
    model, _, _ = run_round([TrAct(TrAct.Settings(lam=0.5))], x, y, max_steps=1)
    init = build_model(tiny().model, (64,), 10, 0)
    out_h = init[1](x)
    hidden = out_h.detach().requires_grad_(True)
    logits = init[3](init[2](hidden))
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    lr = tiny().client.lr
    expected = init[1].weight.detach() - lr * tract_weight_grad(hidden.grad, x, 0.5)
    torch.testing.assert_close(model[1].weight.detach(), expected, rtol=1e-4, atol=1e-6)


def test_settings_and_preflight_refusals():
    with pytest.raises(ValueError):
        TrAct.Settings(lam=0.0)
    with pytest.raises(ValueError):
        TrAct.Settings(layers=-1)
    with pytest.raises(ConfigError, match="client.tract.layers"):
        tiny(['client.plugins=["tract"]', "client.tract.layers=5"])


def test_tract_layers_work_under_torch_func_per_sample_gradients():
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(2)
    lin = TrActLinear(nn.Linear(5, 3).double(), 0.4)
    x, w = torch.randn(6, 5, dtype=DT), torch.randn(6, 3, dtype=DT)
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def loss(p, xi, wi):
        return (functional_call(lin, p, (xi[None],)) * wi[None]).sum()
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, w)["weight"]
    for i in range(6):  # one sample: A is 1 × n, so TrAct's Woodbury branch
        torch.testing.assert_close(per_sample[i], tract_weight_grad(w[i:i + 1], x[i:i + 1], 0.4))
