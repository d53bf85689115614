"""The loop's events: INIT once per client, PROBE cannot change training, progress never restarts,
index-aware batches, the documented dispatch order, conflicts refused before the run."""


import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsim.clients.plugin_api import PLUGINS, ClientPlugin, Event, PluginStack, TrainState
from fedsim.clients.trainer import train_local
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.conftest import tiny


class Recorder(ClientPlugin):
    name = "recorder"
    events = frozenset(Event)

    def __init__(self, settings=None):
        super().__init__(settings)
        self.seen: list[str] = []
        self.progress: list[float] = []
        self.indices: list[torch.Tensor] = []
        self.inits = 0

    def on(self, event, state: TrainState):
        self.seen.append(event.value)
        if event is Event.INIT:
            self.inits += 1
        if event is Event.AFTER_STEP:
            self.progress.append(state.progress)
        if event is Event.ROUND_END:
            self.end_progress = state.progress
        if event is Event.BATCH:
            assert torch.equal(state.batch[0], state.x[state.batch_indices])
            self.indices.append(state.batch_indices.clone())

    def state_dict(self):  # scalars and arrays together: both must come back
        return {"inits": self.inits, "seen_steps": torch.tensor([len(self.progress)])}

    def load_state_dict(self, d):
        self.inits = int(d["inits"])
        self.restored_steps = int(d["seen_steps"][0])


class Prober(ClientPlugin):
    """A probe that does everything a probe must not: steps the weights, draws from the training
    RNG, touches buffers and leaves gradients."""
    name = "prober"
    events = frozenset({Event.PROBE})

    def on(self, event, state):
        out = state.model(state.x[:4])
        torch.nn.functional.cross_entropy(out, state.y[:4]).backward()
        with torch.no_grad():
            for p in state.model.parameters():
                p.add_(1.0)
        torch.randint(0, 10, (5,), generator=state.rng)
        torch.randn(3, generator=state.probe_rng)
        state.metrics["prober/ran"] = 1.0


def _train(stack, rounds=1, round=1, seed=0):
    s = tiny(["client.epochs=2", "client.batch_size=8", "client.max_steps=0"])
    model = build_model(s.model, (64,), 10, 0)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 64, generator=g), torch.arange(20) % 10
    res = train_local(model, x, y, s.client, stack, round=round, client_id=0, seed=seed,
                      rng=torch.Generator().manual_seed(round), config={},
                      progress=(round - 1) / rounds, progress_span=1 / rounds)
    return model, res


def test_every_event_fires_in_the_documented_order_and_after_events_reverse():
    a, b = Recorder(), Recorder()
    b.name = "recorder2"
    stack = PluginStack([a, b])
    stack.trace = []
    _train(stack)
    assert a.seen[:3] == ["init", "round_start", "epoch_start"]
    assert a.seen[-2:] == ["probe", "round_end"]
    per_step = ["batch", "before_forward", "after_forward", "loss", "after_backward", "before_step", "after_step"]
    assert a.seen[4:4 + len(per_step)] == per_step
    trace = stack.trace
    for ev in ("after_forward", "after_backward", "after_step", "epoch_end", "round_end"):
        names = [n for e, n in trace if e == ev][:2]
        assert names == ["recorder2", "recorder"], ev
    for ev in ("init", "round_start", "batch", "loss", "before_step", "probe"):
        assert [n for e, n in trace if e == ev][:2] == ["recorder", "recorder2"], ev


def test_progress_advances_within_a_round_and_continues_across_rounds():
    ends = []
    for r in (1, 2, 3):
        rec = Recorder()
        _train(PluginStack([rec]), rounds=3, round=r)
        assert rec.progress == sorted(rec.progress) and len(set(rec.progress)) == len(rec.progress)
        assert rec.progress[0] == pytest.approx((r - 1) / 3) and rec.progress[-1] < r / 3
        assert rec.end_progress == pytest.approx(r / 3)
        ends.append(rec.end_progress)
    assert ends == sorted(ends)


def test_batches_carry_their_indices_and_cover_each_epoch():
    rec = Recorder()
    _train(PluginStack([rec]))
    per_epoch = [torch.cat(rec.indices[:3]), torch.cat(rec.indices[3:])]
    for idx in per_epoch:
        assert sorted(idx.tolist()) == list(range(20))


def test_a_probe_never_changes_the_trained_weights():
    plain, _ = _train(PluginStack([]))
    probed, res = _train(PluginStack([Prober()]))
    assert res.metrics["prober/ran"] == 1.0
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in probed.parameters())


@pytest.fixture
def task_identity():
    """Messages can only be built inside a task; the local engine sets the same identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _call_fit(context, round):
    from fedsim.clients.runtime import runtime_for
    from fedsim.clients.tasks import ClientCall, fit
    from fedsim.wire import state_to_arrays

    s = tiny(["client.max_steps=2"])
    rt = runtime_for(s)
    cfg = ConfigRecord({"server-round": round, "plugins": "recorder"})
    msg = Message(RecordDict({"arrays": state_to_arrays(rt.model), "config": cfg}), dst_node_id=1,
                  message_type="train")
    return fit(ClientCall(rt, msg, context))


def test_init_fires_once_per_client_and_later_rounds_restore_state(monkeypatch, task_identity):
    made = []

    class Counting(Recorder):
        def __init__(self, settings=None):
            super().__init__(settings)
            made.append(self)

    monkeypatch.setitem(PLUGINS._items, "recorder", Counting)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    for r in (1, 2, 3):
        _call_fit(ctx, r)
    assert [p.seen.count("init") for p in made] == [1, 0, 0]
    assert made[-1].inits == 1  # restored from context.state, not re-initialised
    assert made[-1].restored_steps == 2  # the array part of the state came back too
    other = Context(run_id=1, node_id=2, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    _call_fit(other, 3)
    assert made[-1].seen.count("init") == 1


def test_two_sampler_owners_are_refused_before_the_run_naming_both(monkeypatch):
    from fedsim.catalog import resolve

    class S1(ClientPlugin):
        name, owns = "s_one", frozenset({"sampler"})

    class S2(ClientPlugin):
        name, owns = "s_two", frozenset({"sampler"})

    monkeypatch.setitem(PLUGINS._items, "s_one", S1)
    monkeypatch.setitem(PLUGINS._items, "s_two", S2)
    s = tiny([])
    s = s.model_copy(update={"client": s.client.model_copy(update={"plugins": ["s_one", "s_two"]})})
    with pytest.raises(ConfigError, match="s_one.*s_two"):
        resolve(s)
