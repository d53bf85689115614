"""PGD / FGSM adversarial training (spec §B.12): ball and box constraints, ε = 0 neutral, PGD raises
the loss, the clean/adversarial mix, seeded determinism, the server's robust-accuracy hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.clients.plugin_api import PluginStack
from fedsim.clients.plugins.adversarial import Adversarial, attack, data_range, project
from fedsim.clients.trainer import train_local
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.conftest import tiny

CE = nn.functional.cross_entropy


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("steps,random_start", [(1, False), (1, True), (7, True), (7, False)])
@pytest.mark.parametrize("eps", [0.03, 0.1, 0.5])
def test_perturbation_stays_in_the_ball_and_the_box(eps, steps, random_start):
    model, (x, y) = _model(), _data()
    x_adv = attack(model, x, y, eps, steps, 2.5 * eps / steps, 0.0, 1.0, random_start,
                   torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not torch.equal(x_adv, x)
    assert not x_adv.requires_grad


def test_projection_is_the_box_and_ball_projection():
    x = torch.tensor([0.0, 0.5, 1.0, 0.95])
    cand = torch.tensor([-0.3, 0.9, 1.4, 0.2])
    assert torch.allclose(project(cand, x, 0.1, 0.0, 1.0), torch.tensor([0.0, 0.6, 1.0, 0.85]), atol=1e-7)


@pytest.mark.parametrize("steps", [1, 10])
def test_pgd_increases_the_loss(steps):
    model, (x, y) = _model(), _data()
    eps = 0.1
    x_adv = attack(model, x, y, eps, steps, 2.5 * eps / steps if steps > 1 else eps, 0.0, 1.0, False)
    with torch.no_grad():
        assert CE(model(x_adv), y) > CE(model(x), y)


def test_more_pgd_steps_do_not_weaken_the_attack():
    model, (x, y) = _model(), _data()
    with torch.no_grad():
        losses = [CE(model(attack(model, x, y, 0.1, k, 0.025, 0.0, 1.0, False)), y) for k in (1, 10)]
    assert losses[1] >= losses[0]


def test_attack_is_seeded():
    model, (x, y) = _model(), _data()
    a = attack(model, x, y, 0.1, 3, 0.05, 0.0, 1.0, True, torch.Generator().manual_seed(5))
    b = attack(model, x, y, 0.1, 3, 0.05, 0.0, 1.0, True, torch.Generator().manual_seed(5))
    c = attack(model, x, y, 0.1, 3, 0.05, 0.0, 1.0, True, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attack_touches_no_parameter_gradient():
    model, (x, y) = _model(), _data()
    attack(model, x, y, 0.1, 3, 0.05, 0.0, 1.0, True)
    assert all(p.grad is None for p in model.parameters())


def test_range_from_data_or_fixed():
    x = torch.tensor([[0.2, 0.7], [0.1, 0.9]])
    assert data_range(x) == (pytest.approx(0.1), pytest.approx(0.9))
    assert data_range(x, (0.0, 16.0)) == (0.0, 16.0)


def _train(settings, rounds_seed=0, n=40):
    s = tiny(["client.epochs=1", "client.batch_size=8", "client.max_steps=0"])
    model = build_model(s.model, (1, 8, 8), 10, 0)
    x, y = _data(n, seed=2)
    res = train_local(model, x, y, s.client, PluginStack([Adversarial(settings)]), round=1, client_id=0, seed=0,
                      rng=torch.Generator().manual_seed(rounds_seed), config={})
    return model, res


def test_epsilon_zero_is_bit_identical_to_plain_training():
    s = tiny(["client.epochs=1", "client.batch_size=8", "client.max_steps=0"])
    plain = build_model(s.model, (1, 8, 8), 10, 0)
    x, y = _data(40, seed=2)
    train_local(plain, x, y, s.client, PluginStack([]), round=1, client_id=0, seed=0,
                rng=torch.Generator().manual_seed(0), config={})
    neutral, res = _train(Adversarial.Settings.neutral())
    for a, b in zip(plain.state_dict().values(), neutral.state_dict().values()):
        assert torch.equal(a, b)
    assert "adversarial/robust_accuracy" not in res.metrics


def test_training_on_adversarial_batches_differs_and_reports_robust_accuracy():
    plain, _ = _train(Adversarial.Settings.neutral())
    adv, res = _train(Adversarial.Settings(epsilon=0.2, steps=3))
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), adv.state_dict().values()))
    assert 0.0 <= res.metrics["adversarial/robust_accuracy"] <= 1.0
    again, _ = _train(Adversarial.Settings(epsilon=0.2, steps=3))
    for a, b in zip(adv.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_clean_weight_gives_the_mixed_loss():
    """The loss terms after LOSS sum to (1 - w)·ℓ(x̂) + w·ℓ(x) for the batch the plugin attacked."""
    from fedsim.clients.plugin_api import Event, TrainState

    model, (x, y) = _model(), _data(16)
    w = 0.3
    plugin = Adversarial(Adversarial.Settings(epsilon=0.1, steps=2, clean_weight=w, random_start=False))
    st = TrainState(model=model, optimizer=None, loss_fn=CE, x=x, y=y, device=x.device, round=1, client_id=0,
                    seed=0, rng=torch.Generator(), config={}, batch_size=16, epochs=1)
    plugin.on(Event.ROUND_START, st)
    st.batch = (x, y)
    plugin.on(Event.BATCH, st)
    x_adv = st.batch[0]
    assert not torch.equal(x_adv, x)
    st.outputs = model(x_adv)
    st.loss_terms = {"ce": CE(st.outputs, y)}
    plugin.on(Event.LOSS, st)
    expected = (1 - w) * CE(model(x_adv), y) + w * CE(model(x), y)
    assert sum(st.loss_terms.values()).item() == pytest.approx(expected.item(), rel=1e-6)


def test_server_hook_reports_robust_accuracy_below_clean():
    model, (x, y) = _model(), _data(200)
    # a model that fits this data, so clean accuracy is high and an attack has something to break
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    out = Adversarial.evaluate_global(Adversarial.Settings(epsilon=0.1), model, x, y, seed=0)
    robust = out["adversarial/test_robust_accuracy"]
    assert clean > 0.9 and robust < clean
    at_zero = Adversarial.evaluate_global(Adversarial.Settings(epsilon=0.0), model, x, y, seed=0)
    assert at_zero["adversarial/test_robust_accuracy"] == pytest.approx(clean)
    assert Adversarial.evaluate_global(Adversarial.Settings(eval_steps=0), model, x, y, seed=0) == {}


@pytest.mark.parametrize("bad", [{"epsilon": -0.1}, {"attack": "cw"}, {"steps": 0}, {"clean_weight": 1.5},
                                 {"input_range": [1.0, 0.0]}, {"input_range": [0.0]}, {"step_size": -1.0}])
def test_bad_settings_are_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="client.adversarial"):
        tiny(['client.plugins=["adversarial"]', *(f"client.adversarial.{k}={v!r}".replace("'", '"')
                                                  for k, v in bad.items())])


@pytest.mark.slow
def test_a_run_reports_clean_and_robust_accuracy_every_evaluation(tmp_path):
    """The server's evaluation hook (fedsim.server.plugin_eval_hooks) adds the robust test accuracy."""
    from fedsim.engines.local import run_local
    from fedsim.results import read_jsonl

    s = tiny(['client.plugins=["adversarial"]', "client.adversarial.epsilon=0.1", "client.adversarial.steps=2",
              "client.adversarial.eval_steps=3", "run.rounds=1", "client.max_steps=2"])
    assert run_local(s, tmp_path)["status"] == "completed"
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    for row in rows:  # round 0 (the initial model) and round 1
        assert 0.0 <= row["adversarial/test_robust_accuracy"] <= row["test_accuracy"] + 1e-9
    assert 0.0 <= rows[-1]["adversarial/robust_accuracy"] <= 1.0
