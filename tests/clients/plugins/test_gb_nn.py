"""GB-NN (spec §B.20): the merged network equals the sum of the stage outputs, dropping the last units gives
F_t', each stage fits the pseudo-residuals of the stages before it with only its own block changing, and the
training loss does not increase from stage to stage."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.clients.plugin_api import PluginStack
from fedsim.clients.plugins.gb_nn import GBNN, head_layers, log_priors, pseudo_residuals, stage_outputs, truncate
from fedsim.clients.trainer import train_local
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.clients.plugins.loop_helpers import weights
from tests.conftest import tiny

STAGES, HIDDEN = 4, 16


def _half_sq(fit, target):
    """The stage loss written out: mean over samples of ½ the squared distance to the residual vector."""
    return 0.5 * ((fit - target) ** 2).sum(1).mean()


def _data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # 4 classes, learnable
    return x, y


def _model(seed=0):
    return build_model(tiny([f"model.hidden=[{HIDDEN}]"]).model, (8,), 4, seed)


@functools.lru_cache(maxsize=None)
def _client(steps, lr, batch):
    return tiny([f"model.hidden=[{HIDDEN}]", f"client.max_steps={steps}", f"client.batch_size={batch}",
              f"client.lr={lr}", f"client.epochs={steps}", "client.momentum=0.0"]).client


def _round(model, plugin, x, y, progress, steps=30, lr=0.2, batch=96):
    return train_local(model, x, y, _client(steps, lr, batch), PluginStack([plugin] if plugin else []), round=1,
                       client_id=0, seed=0, rng=torch.Generator().manual_seed(1), progress=progress, progress_span=0.0)


def _hidden(model, x):
    hid, _ = head_layers(model)
    return torch.relu(hid(x.flatten(1)))


def test_merged_network_is_the_bias_plus_the_sum_of_stage_outputs_and_truncation_gives_f_t():
    model, x = _model(), _data()[0]
    _, out = head_layers(model)
    parts = stage_outputs(_hidden(model, x), out, STAGES)
    torch.testing.assert_close(model(x), out.bias + sum(parts))
    for keep in range(STAGES + 1):
        m = _model()
        truncate(m, STAGES, keep)
        torch.testing.assert_close(m(x), out.bias + sum(parts[:keep], torch.zeros_like(parts[0])))


def test_pseudo_residuals_are_the_negative_ce_gradient_and_priors_minimise_a_constant_fit():
    logits = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1, 0])
    F.cross_entropy(logits, y, reduction="sum").backward()
    torch.testing.assert_close(pseudo_residuals(logits.detach(), y), -logits.grad)
    b0 = log_priors(torch.tensor([0] * 30 + [1] * 10), 2)
    torch.testing.assert_close(b0.softmax(0), torch.tensor([31 / 42, 11 / 42]))


def test_a_stage_trains_only_its_block_and_fits_the_residuals_by_mse():
    x, y = _data()
    model = _model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    plugin = GBNN(GBNN.Settings(stages=STAGES, nu=0.5))
    res = _round(model, plugin, x, y, progress=0.3, steps=1, lr=0.1)  # stage 1 (of 0..3)
    assert plugin.stage == 1 and res.metrics["gb_nn/stage"] == 1.0
    hid, out = head_layers(model)
    w = HIDDEN // STAGES
    block = slice(w, 2 * w)
    # direct computation of the one step: prior = bias + block 0; target = residuals; fit = block 1 / nu
    ref = _model()
    rh, ro = head_layers(ref)
    with torch.no_grad():
        ro.bias.copy_(log_priors(y, 4))
        ro.weight[:, 2 * w:].zero_()
    h = torch.relu(rh(x))
    prior = (ro.bias + h[:, :w] @ ro.weight[:, :w].T).detach()
    loss = _half_sq(h[:, block] @ ro.weight[:, block].T / 0.5, pseudo_residuals(prior, y))
    loss.backward()
    torch.testing.assert_close(out.weight[:, block], ro.weight[:, block] - 0.1 * ro.weight.grad[:, block])
    torch.testing.assert_close(hid.weight[block], rh.weight[block] - 0.1 * rh.weight.grad[block])
    # everything else: frozen (bias = log priors, later blocks zero, earlier block untouched)
    torch.testing.assert_close(out.bias, log_priors(y, 4))
    assert torch.equal(out.weight[:, :w], before["3.weight"][:, :w])
    assert torch.equal(hid.weight[:w], before["1.weight"][:w])
    assert not out.weight[:, 2 * w:].any()


def test_training_loss_does_not_increase_from_stage_to_stage():
    x, y = _data()
    model = _model()
    plugin = GBNN(GBNN.Settings(stages=STAGES, nu=0.5))
    ce = []
    for t in range(STAGES):
        res = _round(model, plugin, x, y, progress=(t + 0.5) / STAGES, steps=40, lr=0.5)
        assert plugin.stage == t
        ce.append(res.metrics["gb_nn/prior_ce"])  # CE of F_{t-1}, averaged over the stage's steps
        with torch.no_grad():
            out = head_layers(model)[1]
            parts = stage_outputs(_hidden(model, x), out, STAGES)
            prior = out.bias + sum(parts[:t], torch.zeros_like(parts[0]))
            mse_end = _half_sq(parts[t] / 0.5, pseudo_residuals(prior, y))
        assert float(mse_end) < res.metrics["train_loss"]  # the stage's fit improved over its steps
    final = float(F.cross_entropy(model(x), y).detach())
    ce.append(final)
    assert all(b <= a for a, b in zip(ce, ce[1:])), ce
    assert ce[-1] < 0.8 * ce[0]


def test_neutral_setting_is_the_plain_run():
    x, y = _data()
    a, b = _model(), _model()
    _round(a, None, x, y, 0.0, steps=3)
    _round(b, GBNN(GBNN.Settings.neutral()), x, y, 0.0, steps=3)
    assert weights(a) == weights(b)


def test_settings_and_refusals():
    with pytest.raises(ValueError):
        GBNN.Settings(stages=-1)
    with pytest.raises(ValueError):
        GBNN.Settings(nu=0.0)
    with pytest.raises(ConfigError, match="client.gb_nn.stages"):
        tiny(['client.plugins=["gb_nn"]', "model.hidden=[10]", "client.gb_nn.stages=4"])
    with pytest.raises(ConfigError, match="model.name"):
        tiny(['client.plugins=["gb_nn"]', 'model.name="logreg"', "model.hidden=[]"])
