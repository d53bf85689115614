"""barlow_twins (spec §B.13): C = I gives 0, identical views leave only the off-diagonal part, the formula
equals a naive double loop, invariance to feature scaling, symmetry, N >= 2, the projector persists,
weight = 0 is neutral, and the plugin runs on SemiFL's unlabelled clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.clients.plugins.barlow_twins import BarlowTwins, barlow_twins_loss, cross_correlation
from tests.clients.plugins.loop_helpers import run_round, weights


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def test_identity_correlation_gives_zero():
    z = _hadamard(8)[:, 1:5]  # orthogonal columns, zero mean, unit variance: C = I (up to the BN epsilon)
    assert float(barlow_twins_loss(z, z)) < 1e-8


def test_identical_views_leave_only_the_off_diagonal_term():
    z = torch.randn(32, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    corr = np.corrcoef(z.numpy().T)
    off = (corr ** 2).sum() - (np.diag(corr) ** 2).sum()
    for lam in (0.0, 5e-3, 1.0):
        assert float(barlow_twins_loss(z, z, lam)) == pytest.approx(lam * off, rel=1e-4, abs=1e-8)


def test_formula_matches_a_naive_double_loop_and_is_symmetric():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, 4, generator=gen, dtype=torch.float64), torch.randn(10, 4, generator=gen, dtype=torch.float64)
    an = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)
    bn = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + 1e-5)
    lam, total = 0.3, 0.0
    for i in range(4):
        for j in range(4):
            c = sum(float(an[n, i] * bn[n, j]) for n in range(10)) / 10
            total += (1 - c) ** 2 if i == j else lam * c * c
    assert float(barlow_twins_loss(a, b, lam)) == pytest.approx(total, rel=1e-10)
    assert float(barlow_twins_loss(b, a, lam)) == pytest.approx(total, rel=1e-10)
    perm = torch.tensor([2, 0, 3, 1])  # permuting feature dimensions jointly changes nothing
    assert float(barlow_twins_loss(a[:, perm], b[:, perm], lam)) == pytest.approx(total, rel=1e-10)


def test_invariant_to_feature_scaling():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, 5, generator=gen, dtype=torch.float64), torch.randn(64, 5, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.5, 3.0, 10.0, 1.0, 7.0], dtype=torch.float64)
    assert float(barlow_twins_loss(a * scale + 4.0, b / scale, 0.1)) == pytest.approx(
        float(barlow_twins_loss(a, b, 0.1)), rel=1e-5)


def test_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        cross_correlation(torch.zeros(1, 3), torch.zeros(1, 3))


def test_weight_zero_is_neutral_and_the_term_has_an_effect():
    plain, _, _ = run_round([])
    assert weights(plain) == weights(run_round([BarlowTwins(BarlowTwins.Settings.neutral())])[0])
    model, res, _ = run_round([BarlowTwins(BarlowTwins.Settings(weight=0.5))])
    assert weights(plain) != weights(model) and np.isfinite(res.metrics["barlow_twins/loss"])


def test_projector_is_trained_persisted_and_restored():
    first = BarlowTwins(BarlowTwins.Settings(weight=0.5, projector=8))
    run_round([first])
    saved = first.state_dict()
    assert saved and all(isinstance(v, torch.Tensor) for v in saved.values())
    second = BarlowTwins(BarlowTwins.Settings(weight=0.5, projector=8))
    second.load_state_dict({k: v.numpy() for k, v in saved.items()})
    fresh = BarlowTwins(BarlowTwins.Settings(weight=0.5, projector=8))
    _, _, opt = run_round([second], max_steps=1, optimizer=True)
    run_round([fresh], max_steps=1)
    w = {k: v for k, v in second.state_dict().items() if k.endswith("weight")}
    assert any(not torch.equal(w[k], fresh.state_dict()[k]) for k in w)  # it started from the saved head
    assert len(opt.param_groups) == 1  # the projector's group is removed at ROUND_END


@pytest.mark.slow
def test_runs_on_semifl_unlabelled_clients(tmp_path):
    from fedsim.engines.local import run_local
    from fedsim.results import read_jsonl
    from tests.conftest import tiny

    semi = ['strategy.name="semifl"', "data.server_labelled=60", "strategy.server_epochs=1", 'model.name="cnn"',
            "model.channels=[4]", 'model.norm="batch"', "client.batch_size=10", "client.max_steps=3",
            "strategy.tau=0.0", 'client.plugins=["barlow_twins"]', "client.barlow_twins.weight=0.5"]
    assert run_local(tiny(semi), tmp_path)["status"] == "completed"
    ok = [c for c in read_jsonl(tmp_path / "clients.jsonl") if c["status"] == "ok"]
    assert ok and all(np.isfinite(c["barlow_twins/loss"]) for c in ok)
