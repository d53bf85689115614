"""Ghost batch norm, √-LR scaling and regime adaptation (spec §B.2): one ghost batch is BatchNorm, each
chunk is normalised on its own, running statistics see K updates of momentum m/K, refusals before the run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fedsim.catalog import resolve
from fedsim.clients.plugin_api import ClientPlugin, Event, PluginStack
from fedsim.clients.plugins.ghost_bn import GhostBatchNorm, GhostBN, regime_epochs, sqrt_lr
from fedsim.clients.trainer import train_local
from fedsim.config import scenario_from_dict
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.conftest import TINY, tiny

BN_MODEL = ['model.name="cnn"', 'model.norm="batch"', "model.channels=[4]"]


def _bn(momentum=0.1, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


@pytest.mark.parametrize("ghost", [0, 16, 100])
def test_one_ghost_batch_equals_batchnorm_in_train_and_eval(ghost):
    x = torch.randn(16, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 2 + 1
    ref = _bn()
    gbn_src = copy.deepcopy(ref)
    gbn = GhostBatchNorm(gbn_src, ghost)
    assert gbn.chunks(16) == 1
    out_ref, out_g = ref(x), gbn(x)
    assert torch.equal(out_ref, out_g)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ref, name), getattr(gbn_src, name)), name
    out_ref.square().sum().backward()
    out_g.square().sum().backward()
    assert torch.equal(ref.weight.grad, gbn_src.weight.grad) and torch.equal(ref.bias.grad, gbn_src.bias.grad)
    ref.eval(), gbn.eval()
    assert torch.equal(ref(x), gbn(x))


def test_each_chunk_is_normalised_separately_and_running_stats_use_momentum_over_k():
    x = torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 3 + 2
    bn = _bn(momentum=0.3)
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.zero_()
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    gbn = GhostBatchNorm(bn, 4)
    assert gbn.chunks(12) == 3
    out = gbn(x)
    mean, var = mean0.clone(), var0.clone()
    for k, (part_in, part_out) in enumerate(zip(x.split(4), out.split(4))):
        mu = part_in.mean(dim=(0, 2, 3))
        v = part_in.var(dim=(0, 2, 3), unbiased=False)
        direct = (part_in - mu[None, :, None, None]) / torch.sqrt(v[None, :, None, None] + bn.eps)
        assert torch.allclose(part_out, direct, atol=1e-5), f"chunk {k}"
        assert torch.allclose(part_out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(part_out.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
        m = 0.3 / 3
        mean = (1 - m) * mean + m * mu
        var = (1 - m) * var + m * part_in.var(dim=(0, 2, 3), unbiased=True)
    assert torch.allclose(bn.running_mean, mean, atol=1e-6) and torch.allclose(bn.running_var, var, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3
    # the whole batch normalised at once would differ
    assert not torch.allclose(out, nn.functional.batch_norm(x, None, None, training=True), atol=1e-3)
    gbn.eval()  # evaluation: the running statistics, no chunks
    expect = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    assert torch.allclose(gbn(x), expect, atol=1e-5)


def test_scaling_rules():
    assert sqrt_lr(0.1, 512, 128) == pytest.approx(0.2)
    assert sqrt_lr(0.1, 32, 128) == pytest.approx(0.05)
    assert regime_epochs(2, 512, 128) == 8
    assert regime_epochs(3, 32, 128) == 1
    assert regime_epochs(4, 192, 128) == 6


def _train(settings, batch_size=32, epochs=1, max_steps=0):
    s = tiny(BN_MODEL)
    cfg = s.client.model_copy(update={"batch_size": batch_size, "epochs": epochs, "max_steps": max_steps})
    model = build_model(s.model, (1, 8, 8), 10, 0)
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(96) % 10
    spy = Spy()
    stack = PluginStack([GhostBN(settings), spy] if settings is not None else [spy])
    res = train_local(model, x, y, cfg, stack, round=1, client_id=0, seed=0, rng=torch.Generator().manual_seed(1))
    return model, res, spy.seen


class Spy(ClientPlugin):
    """Records the learning rate and the number of ghost modules at the first step."""

    name = "spy"
    events = frozenset({Event.AFTER_STEP})

    def __init__(self, settings=None):
        super().__init__(settings)
        self.seen = {}

    def on(self, event, state):
        if "lr" not in self.seen:
            self.seen["lr"] = state.optimizer.param_groups[0]["lr"]
            self.seen["ghosts"] = sum(isinstance(m, GhostBatchNorm) for m in state.model.modules())


def test_surgery_in_the_loop_then_undone_with_state_dict_keys_unchanged():
    plain, _, seen_plain = _train(None)
    one, _, seen_one = _train(GhostBN.Settings(ghost_batch_size=64))
    assert seen_plain["ghosts"] == 0 and seen_one["ghosts"] == 1  # swapped during the round
    assert list(one.state_dict()) == list(plain.state_dict())
    assert not any(isinstance(m, GhostBatchNorm) for m in one.modules())  # undone at ROUND_END
    for (k, a), b in zip(plain.state_dict().items(), one.state_dict().values()):
        assert torch.equal(a, b), k  # one ghost batch per batch: BatchNorm exactly
    ghost, _, _ = _train(GhostBN.Settings(ghost_batch_size=8))
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ghost.state_dict().values()))


def test_lr_scaling_and_regime_reach_the_loop():
    _, _, seen = _train(GhostBN.Settings(ghost_batch_size=0, lr_scaling=True, base_batch_size=128), batch_size=32)
    assert seen["lr"] == pytest.approx(0.1 * math.sqrt(32 / 128))
    _, res, _ = _train(GhostBN.Settings(ghost_batch_size=0, regime=True, base_batch_size=16), batch_size=32)
    assert res.steps == 2 * 3  # 2 epochs (= 1 · 32/16) of 3 batches
    _, res, _ = _train(GhostBN.Settings(ghost_batch_size=0), batch_size=32)
    assert res.steps == 3


def test_refused_before_the_run_without_batchnorm_or_with_regime_and_max_steps():
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["ghost_bn"]'])  # the tiny MLP has no BatchNorm
    assert e.value.key == "model.norm" and "ghost_bn" in str(e.value)
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["ghost_bn"]', 'model.name="cnn"', "model.channels=[4]"])
    assert e.value.key == "model.norm" and 'model.norm = "batch"' in str(e.value)
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["ghost_bn"]', *BN_MODEL, "client.ghost_bn.regime=true"])  # tiny has max_steps 5
    assert e.value.key == "client.ghost_bn.regime"
    raw = copy.deepcopy(TINY)
    raw["client"]["max_steps"] = 0
    resolve(scenario_from_dict(raw, ['client.plugins=["ghost_bn"]', *BN_MODEL, "client.ghost_bn.regime=true"]))
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["ghost_bn"]', *BN_MODEL, "client.ghost_bn.ghost_batch_size=-1"])
    assert e.value.key == "client.ghost_bn.ghost_batch_size"
