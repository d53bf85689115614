"""The CNN's grouped-convolution option (``model.group_size``): constant group size, parameter count, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.config import ModelConfig
from fedsim.errors import ConfigError
from fedsim.models import build_model, count_parameters


def _cfg(**kw):
    return ModelConfig(name="cnn", **{"channels": [8, 16, 16], **kw})


def test_every_convolution_after_the_first_has_groups_of_the_given_size():
    model = build_model(_cfg(group_size=4), (1, 8, 8), 10, 0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 2, 4]
    assert all(c.in_channels // c.groups == 4 for c in convs[1:])  # the group size is constant
    assert [tuple(c.weight.shape) for c in convs] == [(8, 1, 3, 3), (16, 4, 3, 3), (16, 4, 3, 3)]


def test_parameter_count_matches_the_grouped_formula():
    # conv1 dense 1->8: 8*1*9+8; conv2 8->16 in 2 groups of 4: 16*4*9+16; conv3 16->16 in 4 groups: 16*4*9+16;
    # 8x8 -> 4 -> 2 (a map smaller than 4 is not pooled); head 16*2*2*10+10
    expected = (8 * 9 + 8) + (16 * 4 * 9 + 16) + (16 * 4 * 9 + 16) + (16 * 4 * 10 + 10)
    assert count_parameters(_cfg(group_size=4), (1, 8, 8), 10) == expected
    dense = (8 * 9 + 8) + (16 * 8 * 9 + 16) + (16 * 16 * 9 + 16) + (16 * 4 * 10 + 10)
    assert count_parameters(_cfg(), (1, 8, 8), 10) == dense


def test_an_output_group_sees_only_its_input_channels():
    model = build_model(_cfg(channels=[8, 16], group_size=4), (1, 8, 8), 10, 0)
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]
    x = torch.randn(2, 8, 4, 4)
    y = x.clone()
    y[:, 4:] += 1.0  # change only the second group's inputs
    a, b = conv(x), conv(y)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.equal(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("kw", [dict(group_size=3), dict(channels=[8], group_size=4),
                                dict(channels=[8, 5], group_size=4)])
def test_impossible_or_ineffective_group_sizes_are_refused(kw):
    with pytest.raises(ConfigError, match="model.group_size"):
        count_parameters(_cfg(**kw), (1, 8, 8), 10)


def test_group_size_on_a_model_without_convolutions_is_refused():
    with pytest.raises(ConfigError, match="model.group_size"):
        count_parameters(ModelConfig(name="mlp", group_size=4), (64,), 10)
