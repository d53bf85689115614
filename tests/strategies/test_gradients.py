"""Gradient plumbing shared by signsgd/mediansgd and coded_gd: layout, flat gradients, model checks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.config import ModelConfig
from fedsim.data.federation import federation_of
from fedsim.errors import ConfigError
from fedsim.models import build_model
from fedsim.rng import derive_seed
from fedsim.strategies.gradients import ParamLayout, check_gradient_model, flat_gradient
from tests.conftest import tiny


class _Net(torch.nn.Module):
    """Two parameters, one frozen parameter, an integer and a float buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
        self.register_buffer("count", torch.tensor(7, dtype=torch.int64))
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def _state(model: torch.nn.Module) -> tuple[list[str], list[np.ndarray]]:
    sd = model.state_dict()
    return list(sd), [v.detach().numpy().copy() for v in sd.values()]


def test_layout_covers_trainable_parameters_only():
    model = _Net()
    layout = ParamLayout.from_model(model)
    assert layout.names == ("lin.weight", "lin.bias")
    assert layout.shapes == ((2, 3), (2,))
    assert layout.sizes == [6, 2] and layout.dim == 8
    keys, _ = _state(model)
    assert [keys[i] for i in layout.positions(keys)] == ["lin.weight", "lin.bias"]
    with pytest.raises(ConfigError):
        layout.positions(["lin.weight"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=8, max_size=8), st.permutations(range(5)))
def test_gather_scatter_round_trip(values, order):
    """scatter(gather(x)) is x, gather(scatter(v)) is v (float32 values), whatever the key order;
    buffers and frozen parameters are never touched."""
    model = _Net()
    keys, arrays = _state(model)
    keys, arrays = [keys[i] for i in order], [arrays[i] for i in order]
    layout = ParamLayout.from_model(model)
    flat = layout.gather(keys, arrays)
    assert flat.dtype == np.float64 and flat.shape == (layout.dim,)
    again = layout.scatter(keys, arrays, flat)
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(again, arrays))
    v = np.asarray(values, dtype=np.float32).astype(np.float64)
    out = layout.scatter(keys, arrays, v)
    np.testing.assert_array_equal(layout.gather(keys, out), v)
    for k, a, b in zip(keys, arrays, out):
        assert a.dtype == b.dtype and a.shape == b.shape
        if k not in layout.names:
            assert b is a                      # buffers and frozen parameters: the same object


def test_scatter_rejects_a_vector_of_the_wrong_size():
    model = _Net()
    keys, arrays = _state(model)
    with pytest.raises(ValueError, match="coordinates"):
        ParamLayout.from_model(model).scatter(keys, arrays, np.zeros(9))


def test_from_scenario_is_the_model_the_run_builds():
    s = tiny()
    fed = federation_of(s)
    model = build_model(s.model, tuple(fed.input_shape), fed.num_classes, derive_seed(s.run.seed, "model-init"))
    assert ParamLayout.from_scenario(s) == ParamLayout.from_model(model)


def test_flat_gradient_matches_autograd_and_sum_is_n_times_mean():
    model = _Net()
    x, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 0, 1])
    g, loss = flat_gradient(model, x, y)
    ref_loss = torch.nn.functional.cross_entropy(model(x), y)
    ref = torch.autograd.grad(ref_loss, [model.lin.weight, model.lin.bias])
    torch.testing.assert_close(g, torch.cat([r.reshape(-1) for r in ref]))
    assert loss == pytest.approx(float(ref_loss.detach()))
    g_sum, loss_sum = flat_gradient(model, x, y, reduction="sum")
    torch.testing.assert_close(g_sum, 5 * g)
    assert loss_sum == pytest.approx(5 * loss)
    assert g.shape == (ParamLayout.from_model(model).dim,)


def test_unused_parameters_get_zero_gradient():
    class Partial(_Net):
        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Linear(2, 2)

    model = Partial()
    g, _ = flat_gradient(model, torch.randn(3, 3), torch.tensor([0, 1, 0]))
    assert g.shape == (ParamLayout.from_model(model).dim,) and not g[-6:].any()


@pytest.mark.parametrize("cfg, key", [(ModelConfig(name="cnn", norm="batch"), "model.norm"),
                                      (ModelConfig(dropout=0.1), "model.dropout")])
def test_nondeterministic_gradients_are_config_errors(cfg, key):
    s = tiny()
    check_gradient_model(s, "signsgd")                  # mlp, no norm, no dropout: fine
    with pytest.raises(ConfigError) as err:
        check_gradient_model(SimpleNamespace(model=cfg), "signsgd")
    assert err.value.key == key
