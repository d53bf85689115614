"""Data Diet (spec §B.5): EL2N equals a direct computation and lies in [0, √2], GraNd² = EL2N²·(‖x‖²+1) for
a linear softmax layer with bias, the prune count is exact and the loop trains on the kept examples only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedsim.clients.plugin_api import ClientPlugin, Event, PluginStack
from fedsim.clients.plugins.data_diet import DataDiet, el2n, grand, keep_indices, score_examples
from fedsim.clients.trainer import train_local
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.conftest import tiny


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(2, 10), st.integers(0, 2**31 - 1), st.floats(0.1, 50.0))
def test_el2n_equals_direct_computation_and_is_within_0_sqrt2(B, C, seed, scale):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (B,), generator=g)
    zn = z.numpy()
    p = np.exp(zn - zn.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(C)[y.numpy()]
    direct = np.sqrt(((p - onehot) ** 2).sum(1))
    got = el2n(z, y).numpy()
    assert np.allclose(got, direct, rtol=1e-10, atol=1e-12)
    assert (got >= 0).all() and (got <= math.sqrt(2) + 1e-12).all()


def test_el2n_extremes():
    y = torch.tensor([0, 1])
    confident_right = torch.tensor([[100.0, -100.0, -100.0], [-100.0, 100.0, -100.0]])
    confident_wrong = torch.tensor([[-100.0, 100.0, -100.0], [100.0, -100.0, -100.0]])
    assert torch.allclose(el2n(confident_right, y), torch.zeros(2), atol=1e-6)
    assert torch.allclose(el2n(confident_wrong, y), torch.full((2,), math.sqrt(2)), atol=1e-6)


def test_grand_squared_is_el2n_squared_times_input_norm_plus_one_for_a_linear_softmax_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(7, 4)).double()
    x = torch.randn(9, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (9,))
    g2 = grand(model, x, y) ** 2
    e2 = el2n(model(x), y) ** 2
    assert torch.allclose(g2, e2 * (x.pow(2).sum(1) + 1), rtol=1e-10)
    assert torch.allclose(score_examples(model, x, y, "grand", batch_size=4) ** 2, g2, rtol=1e-10)


@pytest.mark.parametrize("n,keep,offset", [(10, 0.5, 0.0), (11, 0.5, 0.0), (100, 0.3, 0.1), (7, 0.01, 0.0),
                                           (20, 1.0, 0.0), (20, 0.5, 0.5)])
def test_prune_count_is_exact_and_the_ranking_deterministic(n, keep, offset):
    scores = np.random.default_rng(n).random(n)
    scores[::3] = scores[0]  # ties: broken by position
    kept = keep_indices(scores, keep, offset)
    n_keep = min(max(1, math.floor(keep * n)), n - math.floor(offset * n))
    assert kept.numel() == n_keep and torch.equal(kept, kept.sort().values)
    ranking = sorted(range(n), key=lambda i: (-scores[i], i))
    assert sorted(kept.tolist()) == sorted(ranking[math.floor(offset * n):math.floor(offset * n) + n_keep])
    assert torch.equal(kept, keep_indices(scores, keep, offset))


class Indices(ClientPlugin):
    name = "indices"
    events = frozenset({Event.BATCH})

    def __init__(self, settings=None):
        super().__init__(settings)
        self.seen: list[int] = []

    def on(self, event, state):
        self.seen += state.batch_indices.tolist()


def test_the_loop_trains_on_the_kept_examples_only_from_the_chosen_point():
    s = tiny()
    cfg = s.client.model_copy(update={"batch_size": 8, "epochs": 2, "max_steps": 0})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 64, generator=g), torch.randint(0, 10, (40,), generator=g)
    model = build_model(s.model, (64,), 10, 0)
    diet, seen = DataDiet(DataDiet.Settings(keep=0.25, start=0.5)), Indices()
    early = train_local(model, x, y, cfg, PluginStack([diet, seen]), round=1, client_id=0, seed=0,
                        rng=torch.Generator().manual_seed(1), progress=0.0, progress_span=0.5)
    assert early.steps == 10 and sorted(seen.seen) == sorted(list(range(40)) * 2)  # before `start`: all data
    expected = keep_indices(score_examples(model, x, y), 0.25)
    seen.seen = []
    late = train_local(model, x, y, cfg, PluginStack([diet, seen]), round=2, client_id=0, seed=0,
                       rng=torch.Generator().manual_seed(2), progress=0.5, progress_span=0.5)
    assert late.steps == 2 * 2 and late.metrics["data_diet/kept"] == 10
    assert sorted(seen.seen) == sorted(expected.tolist() * 2)
    state = diet.state_dict()
    fresh = DataDiet(DataDiet.Settings(keep=0.25, start=0.5))
    fresh.load_state_dict(state)
    assert fresh._count == 1 and np.array_equal(fresh._sum, diet._sum)


def test_settings_are_validated_naming_the_key():
    for bad, key in (("keep=0.0", "keep"), ("keep=1.5", "keep"), ('score="loss"', "score"), ("rounds=0", "rounds"),
                     ("offset=0.6", "offset")):
        with pytest.raises(ConfigError) as e:
            tiny(['client.plugins=["data_diet"]', f"client.data_diet.{bad}"])
        assert e.value.key == f"client.data_diet.{key}", bad
