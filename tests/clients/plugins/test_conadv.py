"""ConAdv (spec §B.1): τ = 0 is one-step adversarial training, δ depends only on the snapshot,
‖δ‖∞ ≤ ε inside the data range, no gradient reaches θ through δ, the ring buffer's staleness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.clients.functional import snapshot
from fedsim.clients.plugin_api import PluginStack
from fedsim.clients.plugins.adversarial import Adversarial
from fedsim.clients.plugins.conadv import ConAdv, stale_perturbation
from fedsim.clients.trainer import train_local
from fedsim.models import build_model
from tests.conftest import tiny

CE = nn.functional.cross_entropy


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_delta_is_bounded_in_range_and_the_sign_step():
    model, (x, y) = _model(), _data()
    x_adv = stale_perturbation(model, snapshot(model), x, y, 0.1, 0.0, 1.0)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(CE(model(xr), y), xr)
    assert torch.equal(x_adv, (x + 0.1 * g.sign()).clamp(0, 1))


def test_changing_theta_after_the_snapshot_leaves_delta_unchanged():
    model, (x, y) = _model(), _data()
    snap = snapshot(model)
    before = stale_perturbation(model, snap, x, y, 0.1, 0.0, 1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    after = stale_perturbation(model, snap, x, y, 0.1, 0.0, 1.0)
    assert torch.equal(before, after)
    moved = stale_perturbation(model, snapshot(model), x, y, 0.1, 0.0, 1.0)
    assert not torch.equal(before, moved)


def test_no_gradient_flows_into_theta_through_delta():
    model, (x, y) = _model(), _data()
    x_adv = stale_perturbation(model, dict(model.named_parameters()), x, y, 0.1, 0.0, 1.0)
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert all(p.grad is None for p in model.parameters())
    loss = CE(model(x_adv), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # the same gradient as for a constant input: δ carries no dependence on θ
    const = x_adv.detach().clone()
    ref = torch.autograd.grad(CE(model(const), y), list(model.parameters()))
    for a, b in zip(grads, ref):
        assert torch.equal(a, b)


def _train(plugin, epochs=1):
    s = tiny([f"client.epochs={epochs}", "client.batch_size=8", "client.max_steps=0"])
    model = build_model(s.model, (1, 8, 8), 10, 0)
    x, y = _data(40, seed=2)
    train_local(model, x, y, s.client, PluginStack([plugin] if plugin else []), round=1, client_id=0, seed=0,
                rng=torch.Generator().manual_seed(0), config={})
    return model.state_dict()


def test_tau_zero_equals_one_step_adversarial_training():
    conadv = _train(ConAdv(ConAdv.Settings(epsilon=0.1, staleness=0)))
    fgsm = _train(Adversarial(Adversarial.Settings(epsilon=0.1, attack="fgsm", random_start=False)))
    for a, b in zip(conadv.values(), fgsm.values()):
        assert torch.equal(a, b)


def test_staleness_changes_training_and_epsilon_zero_is_plain():
    plain = _train(None)
    assert all(torch.equal(a, b) for a, b in zip(plain.values(), _train(ConAdv(ConAdv.Settings.neutral())).values()))
    fresh = _train(ConAdv(ConAdv.Settings(epsilon=0.1, staleness=0)))
    stale = _train(ConAdv(ConAdv.Settings(epsilon=0.1, staleness=2)))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.values(), stale.values()))


def test_ring_buffer_serves_the_parameters_of_tau_steps_ago():
    """Drive the events by hand: at step t the plugin perturbs with θ_{max(t − τ, 0)}."""
    from fedsim.clients.plugin_api import Event, TrainState

    tau = 2
    model, (x, y) = _model(), _data(8)
    plugin = ConAdv(ConAdv.Settings(epsilon=0.1, staleness=tau))
    st = TrainState(model=model, optimizer=None, loss_fn=CE, x=x, y=y, device=x.device, round=1, client_id=0,
                    seed=0, rng=torch.Generator(), config={}, batch_size=8, epochs=1)
    plugin.on(Event.ROUND_START, st)
    history = []
    for t in range(5):
        history.append(snapshot(model))  # θ_t
        st.step = t
        st.batch = (x, y)
        plugin.on(Event.BATCH, st)
        want = stale_perturbation(model, history[max(t - tau, 0)], x, y, 0.1, float(x.min()), float(x.max()))
        assert torch.equal(st.batch[0], want), t
        plugin.on(Event.BEFORE_STEP, st)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))


def test_bad_settings_are_refused():
    for bad in ({"epsilon": -1.0}, {"staleness": -1}, {"clean_weight": 2.0}, {"input_range": (0.0, 0.0)}):
        with pytest.raises(ValueError):
            ConAdv.Settings(**bad)
