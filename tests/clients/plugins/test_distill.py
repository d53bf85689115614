"""distill (spec §B.18): s = t gives KL = 0, tau^2 keeps the gradient scale, the teacher gets no
gradients, the loss is Hinton's form, the generic stage regresses features, alpha = 0 is neutral."""

from __future__ import annotations

import pytest
import torch

from fedsim.clients.plugin_api import Event, make_settings
from fedsim.clients.plugins.distill import Distill, feature_loss, kd_loss
from fedsim.errors import ConfigError
from tests.clients.plugins.loop_helpers import Recorder, run_round, weights


def test_identical_logits_give_zero_kl():
    s = torch.randn(8, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for tau in (1.0, 4.0, 20.0):
        assert abs(float(kd_loss(s, s.clone(), tau))) < 1e-12
    assert float(kd_loss(s, s + 1.0, 4.0)) < 1e-12  # a shift of all logits is the same distribution
    assert float(kd_loss(s, 2 * s, 4.0)) > 1e-3


def test_tau_squared_keeps_the_gradient_scale():
    gen = torch.Generator().manual_seed(1)
    t = 0.5 * torch.randn(16, 10, generator=gen, dtype=torch.float64)
    s0 = 0.5 * torch.randn(16, 10, generator=gen, dtype=torch.float64)

    def grad_norm(tau, scaled=True):
        s = s0.clone().requires_grad_(True)
        loss = kd_loss(s, t, tau) / (1.0 if scaled else tau * tau)
        loss.backward()
        return float(s.grad.norm())

    # with tau^2 the gradient approaches (s - t) / (N C) and barely moves with tau; without it it falls as 1/tau^2
    assert grad_norm(20.0) == pytest.approx(grad_norm(40.0), rel=0.02)
    assert grad_norm(20.0, scaled=False) / grad_norm(40.0, scaled=False) == pytest.approx(4.0, rel=0.02)


def test_loss_is_hintons_mixture_and_the_teacher_gets_no_grads():
    plugin = Distill(Distill.Settings(alpha=0.3, tau=2.0))
    seen = []

    def record(event, state):
        if event is Event.AFTER_BACKWARD:
            terms = {k: float(v.detach()) for k, v in state.loss_terms.items()}
            model = state.model
            model.eval()
            with torch.no_grad():
                from fedsim.clients.functional import call_with
                t = call_with(model, plugin._teacher, state.batch[0])
            model.train()
            kd = float(kd_loss(state.outputs.detach(), t, 2.0))
            seen.append((float(state.loss.detach()), terms["ce"], kd))

    initial = {}

    def keep(event, state):
        initial.update({k: v.detach().clone() for k, v in state.model.named_parameters()})

    run_round([Recorder(keep, {Event.ROUND_START}), plugin, Recorder(record, {Event.AFTER_BACKWARD})])
    assert len(seen) == 4
    for total, ce, kd in seen:
        assert total == pytest.approx(0.7 * ce + 0.3 * kd, rel=1e-5, abs=1e-6)
    assert seen[0][2] < 1e-10 and seen[-1][2] > 0  # step 1: student == teacher (the received model)
    for k, v in initial.items():  # the teacher is the received model, frozen: no grads, unchanged
        assert plugin._teacher[k].grad is None and not plugin._teacher[k].requires_grad
        assert torch.equal(plugin._teacher[k], v)


def test_generic_stage_regresses_normalised_features_then_hands_over():
    plugin = Distill(Distill.Settings(alpha=0.5, feature_weight=2.0, generic_until=0.25))
    names = []
    run_round([plugin, Recorder(lambda e, s: names.append((s.progress, sorted(s.loss_terms))), {Event.LOSS})],
              max_steps=4, progress=0.0)
    # progress moves from 0 to 0.5 over 4 steps: steps at progress 0 and 0.125 are generic
    assert [p for p, _ in names] == pytest.approx([0.0, 0.125, 0.25, 0.375])
    assert plugin._steps == {"feature": 2, "kd": 2}
    f = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    assert float(feature_loss(f, f)) < 1e-10 and float(feature_loss(3 * f + 1, f)) < 1e-8  # normalised targets


def test_alpha_zero_is_neutral():
    plain, _, _ = run_round([])
    neutral, _, _ = run_round([Distill(Distill.Settings.neutral())])
    assert weights(plain) == weights(neutral)
    changed, _, _ = run_round([Distill(Distill.Settings(alpha=0.9))])
    assert weights(plain) != weights(changed)


def test_checkpoint_teacher_and_bad_settings(tmp_path):
    import numpy as np

    from fedsim.engines.local import run_local
    from fedsim.results import load_checkpoint
    from tests.conftest import tiny

    run_local(tiny(["run.rounds=1"]), tmp_path / "run")
    path = str(tmp_path / "run" / "checkpoints" / "round_0001.npz")
    plugin = Distill(Distill.Settings(alpha=0.5, teacher=path))
    run_round([plugin])
    ckpt = load_checkpoint(path)
    for k, a in zip(ckpt["meta"]["keys"], ckpt["model"]):
        np.testing.assert_array_equal(plugin._teacher[k].numpy(), a)
    with pytest.raises(ConfigError, match="client.distill"):
        make_settings(Distill, {"teacher": str(tmp_path / "missing.npz")})
    with pytest.raises(ConfigError, match="client.distill"):
        make_settings(Distill, {"feature_weight": 1.0})  # no generic stage: it would have no effect
