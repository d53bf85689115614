"""FedLD margin penalty: spec section 1 test (8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.clients.fedld_loss import fedld_loss, margin_penalty


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
    assert fedld_loss(logits, y, lam).item() == pytest.approx(ce + lam * batch, rel=1e-10)
    assert fedld_loss(logits, y, lam, per_sample=True).item() == pytest.approx(ce + lam * per, rel=1e-10)


def test_lambda_zero_is_cross_entropy_and_gradients_flow():
    logits = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(5, (8,))
    assert torch.equal(fedld_loss(logits, y, 0.0), torch.nn.functional.cross_entropy(logits, y))
    fedld_loss(logits, y, 0.1).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_penalty_prefers_flat_predictions():
    flat = torch.zeros(4, 10)
    peaked = torch.zeros(4, 10)
    peaked[:, 0] = 20.0
    assert margin_penalty(flat) < margin_penalty(peaked)
    assert margin_penalty(peaked).item() == pytest.approx(math.log(1 + 4), rel=1e-6)


def test_rejects_wrong_rank():
    with pytest.raises(ValueError):
        margin_penalty(torch.zeros(2, 3, 4))
