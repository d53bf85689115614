"""SemiFL through the engine: sat-out clients, server-only equivalence, static BN, BN buffers."""

import numpy as np
import pytest
import torch

from fedsim.engines.local import run_local
from fedsim.results import load_checkpoint, read_jsonl
from fedsim.strategies.semifl import apply_bn_statistics, bn_batch_sums
from tests.conftest import tiny

SEMI = ['strategy.name="semifl"', "data.server_labelled=60", "strategy.server_epochs=1", 'model.name="cnn"',
        "model.channels=[4]", 'model.norm="batch"', "client.batch_size=10", "client.max_steps=3"]


def _model(path):
    return load_checkpoint(sorted((path / "checkpoints").glob("round_*.npz"))[-1])["model"]


def test_tau_above_one_equals_server_only(tmp_path):
    run_local(tiny([*SEMI, "strategy.tau=1.01"]), tmp_path / "a")
    run_local(tiny([*SEMI, "strategy.server_only=true"]), tmp_path / "b")
    for x, y in zip(_model(tmp_path / "a"), _model(tmp_path / "b")):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    outs = [c for c in read_jsonl(tmp_path / "a" / "clients.jsonl")]
    assert outs and all(c["status"] == "sat-out" for c in outs)


def test_confident_clients_train_and_change_the_model(tmp_path):
    run_local(tiny([*SEMI, "strategy.tau=0.0"]), tmp_path / "a")
    run_local(tiny([*SEMI, "strategy.server_only=true"]), tmp_path / "b")
    ok = [c for c in read_jsonl(tmp_path / "a" / "clients.jsonl") if c["status"] == "ok"]
    assert ok and all(c["mask-rate"] == 1.0 for c in ok)
    assert any(not np.allclose(x, y) for x, y in zip(_model(tmp_path / "a"), _model(tmp_path / "b")))


def test_needs_server_labels(tmp_path):
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="server_labelled"):
        run_local(tiny(['strategy.name="semifl"']), tmp_path / "run")


def test_static_bn_is_mean_of_batch_moments():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    x = torch.randn(40, 1, 3, 3)
    sums = bn_batch_sums(model, x, batch_size=10)
    apply_bn_statistics(model, [sums])
    with torch.no_grad():
        a = model[0](x)
    batches = [a[i:i + 10] for i in range(0, 40, 10)]
    means = torch.stack([b.transpose(0, 1).reshape(2, -1).mean(1) for b in batches]).mean(0)
    vars_ = torch.stack([b.transpose(0, 1).reshape(2, -1).var(1, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means)
    torch.testing.assert_close(model[1].running_var, vars_)


def test_constant_input_bn_closed_form():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(1))
    x = torch.full((20, 1), 3.0)
    apply_bn_statistics(model, [bn_batch_sums(model, x, batch_size=5)])
    assert float(model[0].running_mean) == pytest.approx(3.0) and float(model[0].running_var) == pytest.approx(0.0)
