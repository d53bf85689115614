"""Convolutional models train in channels-last memory on a CPU (fedsim.models.to_fast_layout): the
layout changes strides only, never what a model holds, sends or computes beyond float rounding."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import fedsim
from fedsim.clients.runtime import runtime_for
from fedsim.config import ModelConfig, load_scenario
from fedsim.models import build_model, to_fast_layout
from fedsim.wire import state_to_arrays, to_numpy

CPU = torch.device("cpu")


def _cnn(norm: str = "group") -> nn.Module:
    return build_model(ModelConfig(name="cnn", channels=[4, 8], norm=norm), (1, 12, 12), 10, 7)


def test_conv_weights_go_channels_last_on_cpu_and_other_models_are_untouched():
    model = to_fast_layout(_cnn(), CPU)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not all(c.weight.is_contiguous() for c in convs)  # the strides really changed
    mlp = build_model(ModelConfig(name="mlp", hidden=[8]), (1, 8, 8), 10, 0)
    before = {k: v.stride() for k, v in mlp.state_dict().items()}
    assert {k: v.stride() for k, v in to_fast_layout(mlp, CPU).state_dict().items()} == before


def test_the_record_a_channels_last_model_sends_is_the_contiguous_models_byte_for_byte():
    plain = _cnn()
    fast = to_fast_layout(copy.deepcopy(plain), CPU)
    a, b = state_to_arrays(plain), state_to_arrays(fast)
    assert list(a.keys()) == list(b.keys())
    assert all(a[k].data == b[k].data for k in a.keys())
    fast.load_state_dict({k: torch.from_numpy(to_numpy(v).copy()) for k, v in a.items()})  # and back
    assert all(fast.state_dict()[k].is_contiguous(memory_format=torch.channels_last)
               for k, v in fast.state_dict().items() if v.dim() == 4)


def test_training_steps_agree_with_the_contiguous_layout_to_float_rounding():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 10, (16,))
    plain = _cnn()
    fast = to_fast_layout(copy.deepcopy(plain), CPU)
    for m in (plain, fast):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(plain.parameters(), fast.parameters()))
    assert 0 <= diff < 1e-5


def test_the_client_runtime_and_a_cnn_run_use_it_and_stay_reproducible(tmp_path):
    scen = load_scenario(Path(__file__).resolve().parents[2] / "scenarios" / "cnn_images.toml")
    rt = runtime_for(scen)
    assert rt.device.type == "cpu"
    assert rt.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    kw = dict(run__rounds=2, data__num_clients=4, data__options__num_samples=400)
    first = fedsim.run(scen, out=tmp_path / "a", **kw).metrics
    second = fedsim.run(scen, out=tmp_path / "b", **kw).metrics
    drop = {"wall_s", "time"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in first] == \
        [{k: v for k, v in r.items() if k not in drop} for r in second]
