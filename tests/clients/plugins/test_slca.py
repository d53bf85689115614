"""slca (spec §B.17): the LR ratio is exact and restored, the backbone is bit-unchanged during classifier
alignment, sampled statistics converge to the stored ones, logit normalisation is scale-invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.clients.plugin_api import Event
from fedsim.clients.plugins.penultimate import classifier_of
from fedsim.clients.plugins.slca import SLCA, class_statistics, normalized_logits, sample_features
from tests.clients.plugins.loop_helpers import Recorder, run_round, weights


def test_backbone_lr_is_exactly_head_lr_times_ratio_and_restored():
    seen = []

    def record(event, state):
        _, head = classifier_of(state.model)
        head_ids = {id(p) for p in head.parameters()}
        for g in state.optimizer.param_groups:
            kind = "head" if all(id(p) in head_ids for p in g["params"]) else "backbone"
            assert all((id(p) in head_ids) == (kind == "head") for p in g["params"])
            seen.append((kind, g["lr"]))

    model, _, opt = run_round([SLCA(SLCA.Settings(lr_ratio=0.01, ca_epochs=0)), Recorder(record, {Event.BEFORE_STEP})],
                              optimizer=True, max_steps=1)
    lr = 0.1  # the tiny scenario's client.lr
    assert sorted(seen) == [("backbone", lr * 0.01), ("head", lr)]
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == lr
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


def test_backbone_is_bit_unchanged_during_classifier_alignment():
    before = {}

    def snap(event, state):  # ROUND_END runs in reverse order: this recorder sees the model before CA
        before.update({k: v.detach().clone() for k, v in state.model.named_parameters()})

    plugin = SLCA(SLCA.Settings(lr_ratio=1.0, ca_epochs=3, ca_samples=64))
    model, res, _ = run_round([plugin, Recorder(snap, {Event.ROUND_END})])
    head_name, _ = classifier_of(model)
    for k, v in model.named_parameters():
        if k.startswith(head_name + "."):
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k
    assert np.isfinite(res.metrics["slca/ca_loss"])


def test_class_statistics_and_sampling_converge_to_the_stored_ones():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(300, 3, generator=gen, dtype=torch.float64) @ torch.tensor([[1.0, 0.5, 0], [0, 1, 0.3], [0, 0, 2]],
                                                                              dtype=torch.float64)
    y = torch.arange(300) % 2
    stats = class_statistics(f, y)
    for c in (0, 1):
        np.testing.assert_allclose(stats[c][0].numpy(), f[y == c].numpy().mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats[c][1].numpy(), np.cov(f[y == c].numpy().T), rtol=1e-10)
    mean, cov = stats[0]
    draws = sample_features(mean, cov, 200_000, torch.Generator().manual_seed(1), jitter=0.0)
    np.testing.assert_allclose(draws.mean(0).numpy(), mean.numpy(), atol=0.02)
    np.testing.assert_allclose(np.cov(draws.numpy().T), cov.numpy(), atol=0.04)


def test_logit_normalisation_is_scale_invariant():
    z = torch.randn(5, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for c in (1e-3, 0.5, 7.0, 1e4):
        torch.testing.assert_close(normalized_logits(c * z, 0.1), normalized_logits(z, 0.1))
    assert normalized_logits(z, 0.1).norm(dim=1).numpy() == pytest.approx(10.0, rel=1e-6)


def test_ratio_one_and_ca_off_are_neutral_and_each_part_has_an_effect():
    plain, _, _ = run_round([])
    assert weights(plain) == weights(run_round([SLCA(SLCA.Settings.neutral())])[0])
    assert weights(plain) != weights(run_round([SLCA(SLCA.Settings(lr_ratio=0.01, ca_epochs=0))])[0])
    assert weights(plain) != weights(run_round([SLCA(SLCA.Settings(lr_ratio=1.0, ca_epochs=1))])[0])
