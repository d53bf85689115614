"""FedLD margin penalty and its plugin: spec section 1 test (8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.clients.plugin_api import Event, TrainState
from fedsim.clients.plugins.fedld_margin import FedLDMargin, margin_penalty


def _loss_terms(logits, y, plugin, config=None):
    """The loss terms the local loop ends up with after the plugin's LOSS event."""
    state = TrainState(model=torch.nn.Identity(), optimizer=None, loss_fn=torch.nn.functional.cross_entropy,
                       x=logits, y=y, device=logits.device, round=1, client_id=0, seed=0,
                       rng=torch.Generator(), config=dict(config or {}), batch_size=len(y), epochs=1)
    state.outputs = logits
    state.loss_terms = {"ce": state.loss_fn(logits, y)}
    plugin.on(Event.LOSS, state)
    return state.loss_terms


@pytest.mark.parametrize("B,C", [(1, 2), (4, 10), (50, 2), (7, 3)])
def test_uniform_predictions(B, C):
    logits = torch.zeros(B, C, dtype=torch.float64)
    assert margin_penalty(logits).item() == pytest.approx(math.log(1 + B / C), rel=1e-12)
    assert margin_penalty(logits, per_sample=True).item() == pytest.approx(math.log(1 + 1 / C), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 16), st.integers(2, 12), st.integers(0, 2**31 - 1), st.floats(0.0, 2.0))
def test_matches_hand_computation(B, C, seed, lam):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(C, (B,), generator=gen)
    z = logits.numpy()
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    ce = -np.mean(np.log(p[np.arange(B), y.numpy()]))
    batch = math.log1p(np.sum(p ** 2))
    per = np.mean(np.log1p(np.sum(p ** 2, axis=1)))
    assert margin_penalty(logits).item() == pytest.approx(batch, rel=1e-10)
    assert margin_penalty(logits, per_sample=True).item() == pytest.approx(per, rel=1e-10)
    for per_sample, pen in ((False, batch), (True, per)):
        terms = _loss_terms(logits, y, FedLDMargin(FedLDMargin.Settings(lam=lam, per_sample=per_sample)))
        assert sum(terms.values()).item() == pytest.approx(ce + lam * pen, rel=1e-10)


def test_plugin_adds_lambda_times_the_functional_form():
    logits = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(5, (8,))
    for per_sample in (False, True):
        terms = _loss_terms(logits, y, FedLDMargin(FedLDMargin.Settings(lam=0.1, per_sample=per_sample)))
        assert set(terms) == {"ce", "fedld_margin"}
        assert torch.equal(terms["fedld_margin"], 0.1 * margin_penalty(logits, per_sample=per_sample))
    sum(terms.values()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_lambda_zero_adds_no_term_and_server_lambda_wins():
    logits, y = torch.randn(8, 5), torch.randint(5, (8,))
    assert set(_loss_terms(logits, y, FedLDMargin(FedLDMargin.Settings.neutral()))) == {"ce"}
    assert set(_loss_terms(logits, y, FedLDMargin(), {"fedld-lambda": 0.0})) == {"ce"}
    terms = _loss_terms(logits, y, FedLDMargin(FedLDMargin.Settings.neutral()), {"fedld-lambda": 0.5})
    assert torch.equal(terms["fedld_margin"], 0.5 * margin_penalty(logits))


def test_negative_lambda_is_rejected():
    with pytest.raises(ValueError, match="lam"):
        FedLDMargin.Settings(lam=-0.1)


def test_penalty_prefers_flat_predictions():
    flat = torch.zeros(4, 10)
    peaked = torch.zeros(4, 10)
    peaked[:, 0] = 20.0
    assert margin_penalty(flat) < margin_penalty(peaked)
    assert margin_penalty(peaked).item() == pytest.approx(math.log(1 + 4), rel=1e-6)


def test_rejects_wrong_rank():
    with pytest.raises(ValueError):
        margin_penalty(torch.zeros(2, 3, 4))
