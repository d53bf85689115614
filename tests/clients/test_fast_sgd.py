"""FastSGD gives torch.optim.SGD's parameters and state bit for bit, and falls back where it must."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from fedsim.clients.fast_sgd import FastSGD


def _train(opt_cls, steps: int, seed: int, **kw) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = opt_cls(model.parameters(), **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(4, 7, generator=g), torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    bufs = {i: s["momentum_buffer"].clone() for i, s in enumerate(opt.state.values()) if "momentum_buffer" in s}
    return [p.detach().clone() for p in model.parameters()], bufs


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 6), lr=st.floats(1e-3, 0.5),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), dampening=st.sampled_from([0.0, 0.3]),
       weight_decay=st.sampled_from([0.0, 1e-3, 0.1]), nesterov=st.booleans())
def test_fast_sgd_equals_torch_sgd_bit_for_bit(seed, steps, lr, momentum, dampening, weight_decay, nesterov):
    if nesterov and (momentum == 0 or dampening != 0):
        nesterov = False
    kw = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    want, want_bufs = _train(torch.optim.SGD, steps, seed, **kw)
    got, got_bufs = _train(FastSGD, steps, seed, **kw)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert want_bufs.keys() == got_bufs.keys()
    assert all(torch.equal(want_bufs[k], got_bufs[k]) for k in want_bufs)


def test_the_fast_path_is_taken_and_torch_sgd_step_is_not_called(monkeypatch):
    calls = []
    real = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: calls.append(1) or real(self, closure))
    model = nn.Linear(3, 2)
    opt = FastSGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert calls == []


@pytest.mark.parametrize("case", ["step_hook", "global_hook", "maximize", "closure", "foreach"])
def test_anything_unusual_takes_torch_sgd_step_with_its_semantics(case):
    model = nn.Linear(3, 2)
    seen = []
    kw = {"maximize": True} if case == "maximize" else {"foreach": True} if case == "foreach" else {}
    opt = FastSGD(model.parameters(), lr=0.1, **kw)
    ref_model = nn.Linear(3, 2)
    ref_model.load_state_dict(model.state_dict())
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, **kw)
    handles = []
    if case == "step_hook":
        handles.append(opt.register_step_post_hook(lambda *a: seen.append("post")))
    if case == "global_hook":
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        handles.append(register_optimizer_step_pre_hook(lambda *a: seen.append("pre")))
    try:
        for o, m in ((opt, model), (ref, ref_model)):
            loss_fn = (lambda m=m: m(torch.ones(2, 3)).pow(2).sum())
            o.zero_grad()
            if case == "closure":
                def closure(m=m, o=o):
                    o.zero_grad()
                    loss = m(torch.ones(2, 3)).pow(2).sum()
                    loss.backward()
                    return loss
                o.step(closure)
            else:
                loss_fn().backward()
                o.step()
    finally:
        for h in handles:
            h.remove()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))
    if case in ("step_hook", "global_hook"):
        assert seen  # the hook ran: the step went through Optimizer's machinery


def test_zero_grad_clears_and_keeps_torch_semantics_without_set_to_none():
    model = nn.Linear(3, 2)
    opt = FastSGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
