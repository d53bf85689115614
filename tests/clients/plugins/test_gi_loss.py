"""Gradient interpolation + TReLU (spec §B.6) and the drift dataset: δ = 0 gives the plain loss, a
model linear in t makes GI independent of δ, |δ*| ≤ Δ, TReLU(τ≡α≡0) = ReLU, ∂_t f = finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.clients.plugin_api import PluginStack
from fedsim.clients.plugins.gi_loss import (GILoss, TimeSource, TReLU, gi_term, model_forward, relu_widths,
                                            search_delta, time_derivative, with_time)
from fedsim.clients.trainer import train_local
from fedsim.data import load_dataset
from fedsim.data.drift import class_means
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.conftest import tiny

CE = nn.functional.cross_entropy


def _batch(n=12, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, -1] = torch.rand(n, generator=g, dtype=torch.float64)
    return x, torch.randint(0, c, (n,), generator=g)


def _net(d=4, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, c)).double()


def test_delta_zero_gives_the_plain_loss():
    model, (x, y) = _net(), _batch()
    f = model_forward(model)
    gi = gi_term(f, x, x[:, -1], y, torch.tensor(0.0, dtype=torch.float64))
    assert gi.item() == pytest.approx(CE(model(x), y).item(), rel=1e-12)


def test_model_linear_in_t_makes_the_term_independent_of_delta():
    """f(x, t) = a(x) + b(x)·t: the first-order extrapolation from t − δ is exact."""
    torch.manual_seed(1)
    a, b = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double(), nn.Linear(3, 3).double()

    def f(x, t):
        return a(x[:, :-1]) + b(x[:, :-1]) * t.reshape(-1, 1)

    x, y = _batch()
    values = [gi_term(f, x, x[:, -1], y, torch.tensor(d, dtype=torch.float64)).item() for d in (-0.15, 0.0, 0.07, 1.0)]
    assert np.ptp(values) < 1e-12
    # and a non-linear model is not: the term does depend on δ
    model = _net()
    g = model_forward(model)
    other = [gi_term(g, x, x[:, -1], y, torch.tensor(d, dtype=torch.float64)).item() for d in (-0.5, 0.5)]
    assert abs(other[0] - other[1]) > 1e-6


def test_time_derivative_matches_finite_differences():
    model, (x, _) = _net(), _batch()
    f = model_forward(model)
    t = x[:, -1]
    _, slope = time_derivative(f, x, t)
    h = 1e-6
    fd = (f(x, t + h) - f(x, t - h)) / (2 * h)
    assert torch.allclose(slope, fd, atol=1e-8)


def test_time_derivative_with_trelu_matches_finite_differences():
    source = TimeSource()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), TReLU(8, source), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model[1].parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x, _ = _batch()
    f, t, h = model_forward(model, source), x[:, -1], 1e-6
    _, slope = time_derivative(f, x, t)
    fd = (f(x, t + h) - f(x, t - h)) / (2 * h)
    assert torch.allclose(slope, fd, atol=1e-7)


@pytest.mark.parametrize("max_delta,lr", [(0.15, 0.1), (0.05, 50.0), (0.0, 1.0)])
def test_searched_delta_is_within_the_bound(max_delta, lr):
    model, (x, y) = _net(), _batch()
    d = search_delta(model_forward(model), x, x[:, -1], y, max_delta, 10, lr, torch.Generator().manual_seed(0))
    assert abs(float(d)) <= max_delta
    assert not d.requires_grad


def test_ascent_raises_the_term():
    model, (x, y) = _net(), _batch()
    f, t = model_forward(model), x[:, -1]
    d0 = (torch.rand((), generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1).double()
    d = search_delta(f, x, t, y, 10.0, 10, 5.0, torch.Generator().manual_seed(0))
    assert gi_term(f, x, t, y, d).item() >= gi_term(f, x, t, y, d0).item()


def test_trelu_with_zero_heads_is_relu():
    source = TimeSource()
    act = TReLU(5, source).double()
    h = torch.randn(7, 5, dtype=torch.float64)
    source.t = torch.rand(7, dtype=torch.float64)
    assert torch.equal(act(h), torch.relu(h))


def test_trelu_threshold_and_leak():
    source = TimeSource()
    act = TReLU(1, source).double()
    with torch.no_grad():
        act.tau.weight.fill_(1.0)
        act.alpha.bias.fill_(0.1)
    source.t = torch.tensor([0.5, 0.5], dtype=torch.float64)
    out = act(torch.tensor([[2.0], [0.0]], dtype=torch.float64))
    assert torch.allclose(out, torch.tensor([[1.5], [-0.05]], dtype=torch.float64))


def test_with_time_replaces_only_the_last_feature():
    x = torch.arange(12.0).reshape(3, 4)
    out = with_time(x, torch.tensor([7.0, 8.0, 9.0]))
    assert torch.equal(out[:, :-1], x[:, :-1]) and torch.equal(out[:, -1], torch.tensor([7.0, 8.0, 9.0]))


def _train(settings, rounds=1):
    s = tiny(['data.dataset="drift"', "client.epochs=1", "client.batch_size=8", "client.max_steps=0"])
    model = build_model(s.model, (3,), 4, 0)
    ds = load_dataset("drift", 0, 0.2, {"num_samples": 200})
    x, y = torch.tensor(ds.x_train[:32]), torch.tensor(ds.y_train[:32])
    plugin = GILoss(settings)
    results = []
    for r in range(1, rounds + 1):
        stack = PluginStack([plugin])
        if r > 1:
            stack.first_visit = set()
        results.append(train_local(model, x, y, s.client, stack, round=r, client_id=0, seed=0,
                                   rng=torch.Generator().manual_seed(r), config={}))
    return model, plugin, results


def test_neutral_setting_is_the_plain_loop_and_gi_changes_training():
    s = tiny(['data.dataset="drift"', "client.epochs=1", "client.batch_size=8", "client.max_steps=0"])
    plain = build_model(s.model, (3,), 4, 0)
    ds = load_dataset("drift", 0, 0.2, {"num_samples": 200})
    x, y = torch.tensor(ds.x_train[:32]), torch.tensor(ds.y_train[:32])
    train_local(plain, x, y, s.client, PluginStack([]), round=1, client_id=0, seed=0,
                rng=torch.Generator().manual_seed(1), config={})
    neutral, _, _ = _train(GILoss.Settings.neutral())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), neutral.state_dict().values()))
    gi, _, res = _train(GILoss.Settings())
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), gi.state_dict().values()))
    assert 0 <= res[0].metrics["gi_loss/mean_abs_delta"] <= 0.15


def test_trelu_heads_are_client_local_persisted_and_keys_unchanged():
    model, plugin, _ = _train(GILoss.Settings(trelu=True), rounds=1)
    assert all(isinstance(m, nn.ReLU) for m in model.modules() if "ReLU" in type(m).__name__)
    keys = set(model.state_dict())
    assert not any("tau" in k or "alpha" in k for k in keys)
    saved = plugin.state_dict()
    assert saved and any(float(v.abs().sum()) > 0 for v in saved.values())  # the heads trained
    restored = GILoss(GILoss.Settings(trelu=True))
    restored.load_state_dict({k: v.numpy() for k, v in saved.items()})
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in saved.items())


def test_relu_widths_of_the_mlp():
    s = tiny(["model.hidden=[16, 8]"])
    widths = relu_widths(build_model(s.model, (3,), 4, 0))
    assert sorted(widths.values()) == [8, 16]


def test_drift_dataset_splits_by_time_and_rotates():
    ds = load_dataset("drift", 0, 0.25, {"num_samples": 800, "noise": 0.0})
    assert ds.x_train[:, -1].max() <= 0.75 < ds.x_test[:, -1].min()
    assert ds.input_shape == (3,)
    t, y = ds.x_train[:, -1].astype(np.float64), ds.y_train
    assert np.allclose(ds.x_train[:, :2], class_means(t, y, 4, np.pi / 2, 2.0), atol=1e-5)
    ids = ds.natural_ids
    assert ids.min() == 0 and ids.max() == 99 and np.all(np.diff(ids[np.argsort(t, kind="stable")]) >= 0)
    again = load_dataset("drift", 0, 0.25, {"num_samples": 800, "noise": 0.0})
    assert np.array_equal(again.x_train, ds.x_train)


def test_preflight_refuses_data_without_time():
    with pytest.raises(ConfigError, match="data.dataset"):
        tiny(['client.plugins=["gi_loss"]'])
    tiny(['client.plugins=["gi_loss"]', "client.gi_loss.weight=0", "client.gi_loss.lam=1"])  # neutral reads no time
    with pytest.raises(ConfigError, match="model.name"):
        tiny(['client.plugins=["gi_loss"]', 'data.dataset="drift"', 'model.name="logreg"',
              "client.gi_loss.trelu=true"])
