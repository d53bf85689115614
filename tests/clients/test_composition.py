"""Three real plugins at once (ghost_bn + hard_batches + distill): they run together through the
ClientApp on the local engine, and the loop dispatches them in the documented order — plugin order
for every event, reversed for AFTER_*, EPOCH_END and ROUND_END, STEP only to the step owner."""

import numpy as np
import torch

from fedsim.clients.plugin_api import REVERSED_EVENTS, Event, build_plugins
from fedsim.clients.trainer import train_local
from fedsim.engines.local import run_local
from fedsim.models import build_model
from fedsim.results import read_jsonl
from tests.conftest import tiny

THREE = ["ghost_bn", "hard_batches", "distill"]
SETTINGS = {"ghost_bn": {"ghost_batch_size": 4}, "hard_batches": {"delta": 0.5}, "distill": {"alpha": 0.5}}
CNN = ['model.name="cnn"', 'model.norm="batch"', "model.channels=[4]"]


def _overrides():
    out = [*CNN, f"client.plugins={THREE}".replace("'", '"')]
    for name, table in SETTINGS.items():
        out += [f"client.{name}.{k}={v}" for k, v in table.items()]
    return out


def test_the_documented_dispatch_order_holds_for_three_real_plugins():
    s = tiny([*_overrides(), "client.epochs=3", "client.batch_size=8", "client.max_steps=0"])
    stack = build_plugins(THREE, lambda n: SETTINGS[n])
    order = [p.name for p in stack.plugins]
    stack.trace = []
    model = build_model(s.model, (1, 8, 8), 10, 0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8, generator=g) * 16, torch.arange(40) % 10
    train_local(model, x, y, s.client, stack, round=1, client_id=0, seed=0, rng=torch.Generator().manual_seed(1),
                config={}, progress=0.0, progress_span=0.5)
    fired = {e for e, _ in stack.trace}
    assert {"round_start", "sampler", "before_forward", "loss", "after_step", "round_end"} <= fired
    for ev in Event:
        subs = [p.name for p in stack.plugins if ev in p.events]
        if not subs or ev is Event.STEP:
            continue
        expected = subs[::-1] if ev in REVERSED_EVENTS else subs
        # every dispatch of this event visits its subscribers in the expected order
        seq = [n for e, n in stack.trace if e == ev.value]
        assert len(seq) % len(expected) == 0, ev
        for i in range(0, len(seq), len(expected)):
            assert seq[i:i + len(expected)] == expected, (ev, order)
    # the events come in the loop's documented order
    first = {}
    for i, (e, _) in enumerate(stack.trace):
        first.setdefault(e, i)
    assert first["round_start"] < first["sampler"] < first["before_forward"] < first["loss"] < first["after_step"] \
        < first["round_end"]
    assert stack.trace[-1][0] == "round_end"


def test_three_plugins_run_together_end_to_end(tmp_path):
    s = tiny([*_overrides(), "run.rounds=2", "client.batch_size=8", "client.max_steps=6"])
    assert s.client.plugins == THREE
    summary = run_local(s, tmp_path)
    assert summary["status"] == "completed"
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert np.isfinite(rows[-1]["test_loss"])
    ok = [c for c in read_jsonl(tmp_path / "clients.jsonl") if c["status"] == "ok"]
    assert len(ok) == 2 * 4
