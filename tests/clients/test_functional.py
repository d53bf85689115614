"""Per-sample gradients, Hessian/GGN-vector products and snapshots against direct computations."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedsim.clients.functional import (batch_loss_fn, call_with, flat, ggn_vp, hvp, params_of,
                                       per_sample_grads, snapshot)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _data(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 12), budget=st.sampled_from([1, 500, 10**9]))
def test_per_sample_grads_equal_one_backward_per_example(n, budget):
    model, (x, y) = _mlp(), _data(n)
    got = per_sample_grads(model, x, y, max_bytes=budget)
    for i in range(n):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in model.named_parameters():
            assert torch.allclose(got[k][i], p.grad, atol=1e-12), (k, i)


def test_per_sample_grads_refuse_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    x, y = _data()
    with pytest.raises(ValueError, match="BatchNorm1d"):
        per_sample_grads(model, x, y)
    model.eval()
    assert per_sample_grads(model, x, y)["0.weight"].shape == (9, 4, 5)


def test_hvp_equals_the_dense_hessian_times_v():
    model, (x, y) = _mlp(), _data()
    params = snapshot(model)
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    f = batch_loss_fn(model, x, y)

    def f_flat(vec):
        parts = torch.split(vec, sizes)
        return f({k: p.reshape(s) for k, p, s in zip(names, parts, shapes)})

    H = torch.autograd.functional.hessian(f_flat, flat(params))
    v = {k: torch.randn_like(t) for k, t in params.items()}
    assert torch.allclose(flat(hvp(f, params, v)), H @ flat(v), atol=1e-10)


def test_ggn_is_the_hessian_for_a_linear_model_and_psd():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()  # outputs linear in the parameters: GGN == Hessian
    x, y = _data()
    params = snapshot(model)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    assert torch.allclose(flat(ggn_vp(model, x, y, params, v)), flat(hvp(batch_loss_fn(model, x, y), params, v)),
                          atol=1e-10)
    deep = _mlp()
    p2 = snapshot(deep)
    w = {k: torch.randn_like(t) for k, t in p2.items()}
    assert float(flat(ggn_vp(deep, x, y, p2, w)) @ flat(w)) >= -1e-12


def test_snapshot_is_detached_and_call_with_evaluates_it_without_touching_the_model():
    model, (x, _) = _mlp(), _data()
    snap = snapshot(model)
    before = model(x).detach()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.allclose(call_with(model, snap, x), before)
    assert not torch.allclose(model(x), before)
    assert all(not t.requires_grad for t in snap.values())
    assert set(snap) == set(params_of(model))
