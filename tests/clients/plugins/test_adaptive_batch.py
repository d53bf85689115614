"""AdAdaGrad (spec §B.4): the norm and augmented inner-product tests in closed form, growth when the
test fails, V = 0 leaves b alone, Cockpit's norm-test relation, the AdaGrad(-Norm) steps, b growing
inside an epoch with the sample budget kept, b persisted per client, refusals before the run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsim.clients.functional import per_sample_grads
from fedsim.clients.plugin_api import PluginStack
from fedsim.clients.plugins.adaptive_batch import (AdaptiveBatch, adagrad_norm_step, adagrad_step,
                                                   inner_product_test, norm_test, norm_test_statistic)
from fedsim.clients.trainer import train_local
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.conftest import tiny


def _noisy(m=64, d=20, mean=0.1, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(m, d, generator=g, dtype=torch.float64)


def test_norm_test_closed_form():
    g = _noisy()
    var = float(g.var(dim=0, correction=1).sum())
    mean_sq = float(g.mean(0).square().sum())
    eta = 0.5
    want = math.ceil(var / (eta ** 2 * mean_sq))
    assert want > 8
    assert norm_test(g, 8, eta, 10 ** 6) == want
    assert norm_test(g, 8, eta, 50) == min(50, want)  # capped
    assert norm_test(g, 10 ** 5, eta, 10 ** 6) == 10 ** 5  # never decreases


def test_grows_when_the_test_fails_and_not_when_it_passes():
    noisy, clean = _noisy(std=2.0), _noisy(std=0.01, mean=1.0)
    assert norm_test(noisy, 4, 0.5, 10 ** 6) > 4
    assert norm_test(clean, 4, 0.5, 10 ** 6) == 4
    assert inner_product_test(noisy, 4, 0.5, 1.0, 10 ** 6) > 4
    assert inner_product_test(clean, 4, 0.5, 1.0, 10 ** 6) == 4


def test_identical_samples_have_zero_variance_and_leave_b_unchanged():
    g = torch.ones(16, 1).double() * torch.randn(1, 30, dtype=torch.float64)
    var, mean_sq = norm_test_statistic(g)
    assert var == pytest.approx(0.0, abs=1e-20) and mean_sq > 0
    assert norm_test(g, 7, 0.1, 1000) == 7
    assert inner_product_test(g, 7, 0.1, 0.1, 1000) == 7


def test_inner_product_test_closed_form():
    g = _noisy(m=40, d=6, mean=0.3, std=0.8, seed=2)
    mean = g.mean(0)
    ms = float(mean @ mean)
    inner = g @ mean
    ortho = g - torch.outer(inner, mean) / ms
    theta, nu = 0.5, 1.0
    want = math.ceil(max(float(inner.var()) / (theta ** 2 * ms ** 2), float(ortho.var(dim=0).sum()) / (nu ** 2 * ms)))
    # by hand, loop over samples and coordinates
    n = g.shape[0]
    ip = [float(sum(g[i, j] * mean[j] for j in range(6))) for i in range(n)]
    ip_mean = sum(ip) / n
    ip_var = sum((v - ip_mean) ** 2 for v in ip) / (n - 1)
    assert ip_var == pytest.approx(float(inner.var()), rel=1e-10)
    assert inner_product_test(g, 1, theta, nu, 10 ** 7) == max(1, want)


def test_agrees_with_cockpits_norm_test_relation():
    """θ_max² = ΣV / (b ‖ḡ‖²) and b' = b θ_max² / η² (Cockpit's NormTest)."""
    g = _noisy(m=32, d=50, mean=0.2, std=1.5, seed=4)
    b, eta = 32, 0.7
    var, mean_sq = norm_test_statistic(g)
    theta_max_sq = var / (b * mean_sq)
    assert norm_test(g, 1, eta, 10 ** 7) == math.ceil(b * theta_max_sq / eta ** 2)


def test_statistics_from_per_sample_gradients_of_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 5))
    x, y = torch.randn(12, 8), torch.randint(0, 5, (12,))
    grads = per_sample_grads(model, x, y)
    flat = torch.cat([v.reshape(12, -1) for v in grads.values()], 1).double()
    var, mean_sq = norm_test_statistic(grads)
    assert var == pytest.approx(float(flat.var(0).sum()), rel=1e-9)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    full = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    assert mean_sq == pytest.approx(float(full @ full), rel=1e-5)


def test_adagrad_norm_and_adagrad_steps():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    acc = torch.tensor(0.01, dtype=torch.float64)
    adagrad_norm_step([p], acc, lr=0.5)
    assert float(acc) == pytest.approx(25.01)
    scale = 0.5 / (math.sqrt(25.01) + 1e-10)
    assert torch.allclose(p.detach(), torch.tensor([1.0 - 3 * scale, -2.0 - 4 * scale], dtype=torch.float64))
    q = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    q.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    accs = [torch.full((2,), 0.01, dtype=torch.float64)]
    adagrad_step([q], accs, lr=0.5)
    want = torch.tensor([1.0 - 0.5 * 3 / (math.sqrt(9.01) + 1e-10), -2.0 - 0.5 * 4 / (math.sqrt(16.01) + 1e-10)],
                        dtype=torch.float64)
    assert torch.allclose(q.detach(), want)


class _Sizes:
    """Records the batch sizes the loop really trained on."""

    def __init__(self, plugin):
        self.plugin, self.sizes = plugin, []
        self.name, self.events, self.owns, self.needs, self.after = plugin.name, plugin.events, plugin.owns, \
            plugin.needs, plugin.after

    def on(self, event, state):
        from fedsim.clients.plugin_api import Event
        if event is Event.AFTER_STEP:
            self.sizes.append(int(state.batch[1].shape[0]))
        self.plugin.on(event, state)


def _train(settings, n=64, bs=4, max_steps=0, plugin=None, rnd=1):
    s = tiny(["client.epochs=1", f"client.batch_size={bs}", f"client.max_steps={max_steps}", "client.momentum=0.0"])
    model = build_model(s.model, (1, 8, 8), 10, 0)
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    plugin = plugin or AdaptiveBatch(settings)
    rec = _Sizes(plugin)
    res = train_local(model, x, y, s.client, PluginStack([rec]), round=rnd, client_id=0, seed=0,
                      rng=torch.Generator().manual_seed(rnd), config={})
    return model, rec.sizes, res, plugin


def test_batch_grows_within_an_epoch_and_the_epoch_covers_the_data_once():
    _, sizes, res, plugin = _train(AdaptiveBatch.Settings(test="norm", eta=0.5))
    assert sizes[0] == 4 and len(sizes) >= 3 and all(a < b for a, b in zip(sizes[:-2], sizes[1:-1]))
    assert sum(sizes) == 64 and res.metrics["adaptive_batch/batch_size"] == plugin.b > 4
    assert res.metrics["adaptive_batch/grew"] >= 2
    _, ip_sizes, _, _ = _train(AdaptiveBatch.Settings(test="inner_product"))
    assert ip_sizes[0] == 4 and max(ip_sizes) > 4 and sum(ip_sizes) == 64


def test_sample_budget_with_max_steps():
    _, sizes, _, _ = _train(AdaptiveBatch.Settings(test="norm", eta=0.05), max_steps=5)
    assert sum(sizes) <= 5 * 4 and len(sizes) <= 5


def test_b_is_persisted_and_capped_by_the_data_size():
    _, _, _, plugin = _train(AdaptiveBatch.Settings(test="norm", eta=0.01))
    b = plugin.b
    assert b <= 64
    again = AdaptiveBatch(AdaptiveBatch.Settings(test="norm", eta=0.01))
    again.load_state_dict(plugin.state_dict())
    _, sizes, _, _ = _train(None, plugin=again, rnd=2)
    assert sizes[0] == b
    _, _, _, capped = _train(AdaptiveBatch.Settings(test="norm", eta=0.01, b_max=9))
    assert capped.b <= 9


def test_neutral_setting_is_the_plain_loop():
    s = tiny(["client.epochs=1", "client.batch_size=4", "client.max_steps=0", "client.momentum=0.0"])
    plain = build_model(s.model, (1, 8, 8), 10, 0)
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    train_local(plain, x, y, s.client, PluginStack([]), round=1, client_id=0, seed=0,
                rng=torch.Generator().manual_seed(1), config={})
    neutral, sizes, _, _ = _train(AdaptiveBatch.Settings.neutral())
    assert sizes == [4] * 16
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), neutral.state_dict().values()))
    adagrad, _, _, _ = _train(AdaptiveBatch.Settings(test="none"))
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), adagrad.state_dict().values()))


def test_refusals_before_the_run():
    with pytest.raises(ConfigError, match="client.optimizer"):
        tiny(['client.plugins=["adaptive_batch"]', "client.momentum=0.9"])
    with pytest.raises(ConfigError, match="model.norm"):
        tiny(['client.plugins=["adaptive_batch"]', 'model.name="cnn"', 'model.norm="batch"'])
    with pytest.raises(ConfigError, match="client.adaptive_batch"):
        tiny(['client.plugins=["adaptive_batch"]', 'client.adaptive_batch.test="variance"'])
    tiny(['client.plugins=["adaptive_batch"]', "client.momentum=0.9", 'client.adaptive_batch.optimizer="client"'])
