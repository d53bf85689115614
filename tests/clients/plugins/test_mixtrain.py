"""mixtrain (spec §B.23 core): the EMA formula, the threshold respected by pseudo-labels and by the
weak/strong choice, threshold 1 reduces to supervised training on the given (weak) batch, and the plugin
runs on SemiFL's unlabelled clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.clients.plugins.mixtrain import MixTrain, choose_views, confident_pseudo_labels, ema_update
from tests.clients.plugins.loop_helpers import run_round, weights


def test_ema_formula():
    t = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    s = {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([10.0])}
    ema_update(t, s, 0.9)
    torch.testing.assert_close(t["w"], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2]))
    torch.testing.assert_close(t["b"], torch.tensor([1.0]))
    ema_update(t, s, 0.0)
    torch.testing.assert_close(t["w"], s["w"])


def test_threshold_is_respected():
    probs = torch.tensor([[0.7, 0.3], [0.69, 0.31], [0.2, 0.8], [1.0, 0.0]])
    mask, labels = confident_pseudo_labels(probs, 0.7)
    assert mask.tolist() == [True, False, True, True] and labels.tolist() == [0, 0, 1, 0]
    assert not confident_pseudo_labels(probs, 1.0)[0].any()  # 1 means never, even for a saturated softmax
    weak, strong = torch.zeros(4, 3), torch.ones(4, 3)
    views, use = choose_views(weak, strong, probs, torch.tensor([0, 0, 0, 1]), 0.7)
    assert use.tolist() == [True, False, False, False]
    assert views[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_threshold_one_is_supervised_training_on_the_given_batch():
    plain, _, _ = run_round([])
    assert weights(plain) == weights(run_round([MixTrain(MixTrain.Settings(threshold=1.0, weight=1.0))])[0])
    assert weights(plain) == weights(run_round([MixTrain(MixTrain.Settings.neutral())])[0])
    model, res, _ = run_round([MixTrain(MixTrain.Settings(threshold=0.0, weight=1.0))])
    assert weights(plain) != weights(model)
    assert res.metrics["mixtrain/strong_rate"] == 1.0 and res.metrics["mixtrain/pseudo_rate"] == 1.0


def test_teacher_follows_the_student_by_ema():
    plugin = MixTrain(MixTrain.Settings(threshold=0.5, weight=0.0, ema=0.5))
    model, _, _ = run_round([plugin], max_steps=1)
    # one step: teacher = 0.5 * received + 0.5 * trained, so it sits halfway between them
    from fedsim.models import build_model
    from tests.conftest import tiny

    received = build_model(tiny().model, (64,), 10, 0)  # the model run_round starts from
    for k, v in model.named_parameters():
        start = dict(received.named_parameters())[k]
        torch.testing.assert_close(plugin.teacher[k], 0.5 * start.detach() + 0.5 * v.detach())


@pytest.mark.slow
def test_runs_on_semifl_unlabelled_clients(tmp_path):
    from fedsim.engines.local import run_local
    from fedsim.results import read_jsonl
    from tests.conftest import tiny

    semi = ['strategy.name="semifl"', "data.server_labelled=60", "strategy.server_epochs=1", 'model.name="cnn"',
            "model.channels=[4]", 'model.norm="batch"', "client.batch_size=10", "client.max_steps=3",
            "strategy.tau=0.0", 'client.plugins=["mixtrain"]', "client.mixtrain.threshold=0.0"]
    assert run_local(tiny(semi), tmp_path)["status"] == "completed"
    ok = [c for c in read_jsonl(tmp_path / "clients.jsonl") if c["status"] == "ok"]
    assert ok and all(c["mixtrain/strong_rate"] == 1.0 for c in ok)
