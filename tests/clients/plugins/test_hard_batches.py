"""Hard batches (DyBAT, spec §B.3): exactly the top-⌊δb⌋ batches by recorded loss, δ = 1 is the plain run,
the plain step budget, deterministic, state persisted across rounds; two sampler owners refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.clients.plugin_api import ClientPlugin, Event, PluginStack
from fedsim.clients.plugins.hard_batches import HardBatches, fixed_batches, select_hard
from fedsim.clients.trainer import train_local
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.conftest import tiny

N, B = 100, 10  # b = 10 fixed batches


class StepLog(ClientPlugin):
    """Records (batch indices, loss) of every step."""

    name = "steplog"
    events = frozenset({Event.AFTER_STEP})

    def __init__(self, settings=None):
        super().__init__(settings)
        self.steps: list[tuple[torch.Tensor, float]] = []

    def on(self, event, state):
        self.steps.append((state.batch_indices.clone(), float(state.loss.detach())))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 64, generator=g), torch.randint(0, 10, (N,), generator=g)


def _run(plugins, epochs=3, max_steps=0, model=None, round=1):
    s = tiny()
    cfg = s.client.model_copy(update={"batch_size": B, "epochs": epochs, "max_steps": max_steps, "momentum": 0.9})
    model = model if model is not None else build_model(s.model, (64,), 10, 0)
    x, y = _data()
    res = train_local(model, x, y, cfg, PluginStack(plugins), round=round, client_id=2, seed=5,
                      rng=torch.Generator().manual_seed(round))
    return model, res


def test_select_hard_is_the_top_k_by_loss():
    rng = np.random.default_rng(0)
    for b in (1, 3, 10, 17):
        losses = rng.random(b)
        for delta in (0.1, 0.3, 0.5, 0.99, 1.0):
            got = select_hard(losses, delta)
            k = max(1, math.floor(delta * b))
            assert len(got) == k and list(got) == sorted(got)
            assert set(got) == set(np.argsort(losses)[::-1][:k])
            assert losses[got].min() >= np.delete(losses, got).max(initial=-np.inf)


def test_the_loop_visits_exactly_the_top_delta_batches_by_recorded_loss():
    plugin, log = HardBatches(HardBatches.Settings(delta=0.3)), StepLog()
    _, res = _run([plugin, log], epochs=3)
    batches = fixed_batches(N, B, 5, 2)
    ids = [next(i for i, b in enumerate(batches) if torch.equal(b, idx)) for idx, _ in log.steps]
    assert ids == plugin.visited
    assert ids[:10] == list(range(10))  # the first pass: every batch, in id order
    # replay the rule from the recorded losses alone
    losses = np.full(10, np.nan)
    expected, pending = [], list(range(10))
    for (_, loss), i in zip(log.steps, ids):
        if not pending:
            pending = sorted(np.argsort(-losses, kind="stable")[:3].tolist())
        expected.append(pending.pop(0))
        losses[i] = loss
    assert ids == expected
    assert len(set(ids[10:13])) == 3 and res.steps == 30  # k = ⌊0.3·10⌋ per pass; the plain budget


def test_delta_one_is_bit_identical_to_the_plain_loop():
    plain, res_plain = _run([], epochs=2)
    same, res_same = _run([HardBatches(HardBatches.Settings(delta=1.0))], epochs=2)
    assert res_plain.steps == res_same.steps
    for a, b in zip(plain.state_dict().values(), same.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("epochs,max_steps", [(1, 0), (3, 0), (3, 7)])
def test_step_budget_is_the_plain_runs(epochs, max_steps):
    _, plain = _run([], epochs=epochs, max_steps=max_steps)
    _, hard = _run([HardBatches(HardBatches.Settings(delta=0.5))], epochs=epochs, max_steps=max_steps)
    assert hard.steps == plain.steps


def test_deterministic_and_persisted_across_rounds():
    first = HardBatches(HardBatches.Settings(delta=0.5))
    m1, _ = _run([first], epochs=1, max_steps=7)  # stops inside the first pass
    state = first.state_dict()
    assert np.isnan(state["losses"]).sum() == 3 and list(state["pending"]) == [7, 8, 9]
    again = HardBatches(HardBatches.Settings(delta=0.5))
    m2, _ = _run([again], epochs=1, max_steps=7)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    restored = HardBatches(HardBatches.Settings(delta=0.5))
    restored.load_state_dict(state)
    _run([restored], epochs=1, max_steps=7, model=m1, round=2)
    assert restored.visited[:3] == [7, 8, 9]  # the pass goes on where the last round stopped
    assert len(restored.visited) == 7 and len(set(restored.visited[3:])) == 4  # then a pass of k = 5
    assert not np.isnan(restored.losses).any()


def test_two_sampler_owners_are_refused_before_the_run_naming_both():
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["hard_batches", "data_diet"]'])
    assert e.value.key == "client.plugins"
    assert "hard_batches" in str(e.value) and "data_diet" in str(e.value) and "sampler" in str(e.value)


@pytest.mark.slow
def test_composes_with_ghost_bn_and_microbatch_on_the_local_engine(tmp_path):
    """Three plugins at once (surgery, sampler, forward owner) through the real ClientApp: state persisted
    in context.state between rounds, the run completes."""
    from fedsim.engines.local import run_local
    from fedsim.results import read_jsonl

    s = tiny(['client.plugins=["ghost_bn", "hard_batches", "microbatch"]', 'model.name="cnn"', 'model.norm="batch"',
              "model.channels=[4]", "client.ghost_bn.ghost_batch_size=8", "client.microbatch.micro_batches=2",
              "client.microbatch.segments=2", "run.rounds=3"])
    assert run_local(s, tmp_path)["status"] == "completed"
    rows = [r for r in read_jsonl(tmp_path / "clients.jsonl") if r["status"] == "ok"]
    assert len(rows) == 12 and all(r["hard_batches/selected"] == 5.0 for r in rows)  # ⌊0.5·⌊360/32⌋⌋ = 5
    assert all(r["ghost_bn/ghosts_per_batch"] == 4.0 for r in rows)
