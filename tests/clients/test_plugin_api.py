"""The plugin interface: ordering, named loss terms, ownership, neutral settings, persisted state."""

from dataclasses import dataclass

import pytest
import torch

from fedsim.clients.plugin_api import ClientPlugin, Event, PluginStack, TrainState
from fedsim.clients.plugins.fedprox import FedProx
from fedsim.clients.trainer import train_local
from fedsim.config import ClientConfig
from fedsim.errors import ConfigError


class Recorder(ClientPlugin):
    events = frozenset(Event)

    def __init__(self, name, log, owns=frozenset(), after=()):
        super().__init__()
        self.name = name
        self.log = log
        self.owns = owns
        self.after = after

    def on(self, event, state):
        self.log.append((event, self.name))
        if event is Event.STEP:
            state.optimizer.step()


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _train(model, plugins, steps=4, config=None):
    x, y = _data()
    cfg = ClientConfig(epochs=1, batch_size=10, lr=0.1, max_steps=steps)
    return train_local(model, x, y, cfg, PluginStack(plugins), round=1, client_id=0, seed=0,
                       rng=torch.Generator().manual_seed(1), config=config)


def test_after_events_run_in_reverse_order():
    log = []
    _train(_model(), [Recorder("a", log), Recorder("b", log)], steps=1)
    before = [n for e, n in log if e is Event.BEFORE_FORWARD]
    after = [n for e, n in log if e is Event.AFTER_BACKWARD]
    assert before == ["a", "b"] and after == ["b", "a"]
    assert [n for e, n in log if e is Event.ROUND_END] == ["b", "a"]


def test_every_event_fires_and_is_documented():
    """The loop fires every Event (STEP only for the step owner); the Event docstring names each one."""
    log = []
    _train(_model(), [Recorder("a", log, owns=frozenset({"step"}))], steps=2)
    assert list(dict.fromkeys(e for e, _ in log)) == list(Event)  # first firings follow the enum order
    fired_once = [e for e, _ in log if e in (Event.ROUND_START, Event.ROUND_END)]
    assert fired_once == [Event.ROUND_START, Event.ROUND_END]
    for ev in Event:
        assert f"# {ev.name}" in Event.__doc__ and f"{ev.name}: " in Event.__doc__, ev


def test_after_constraint_reorders():
    log = []
    stack = PluginStack([Recorder("a", log, after=("b",)), Recorder("b", log)])
    assert [p.name for p in stack.plugins] == ["b", "a"]


def test_two_step_owners_conflict():
    with pytest.raises(ConfigError, match="both take over the step"):
        PluginStack([Recorder("a", [], owns=frozenset({"step"})), Recorder("b", [], owns=frozenset({"step"}))])


def test_step_owner_replaces_optimizer_step():
    log = []
    _train(_model(), [Recorder("a", log, owns=frozenset({"step"}))], steps=2)
    assert sum(1 for e, _ in log if e is Event.STEP) == 2


def test_loss_terms_are_named_not_overwritten():
    class Twice(ClientPlugin):
        name = "twice"
        events = frozenset({Event.LOSS})

        def on(self, event, state):
            state.add_loss("x", state.loss_terms["ce"] * 0)
            state.add_loss("x", state.loss_terms["ce"] * 0)

    with pytest.raises(RuntimeError, match="added twice"):
        _train(_model(), [Twice()], steps=1)


def test_fedprox_neutral_reproduces_plain_run_exactly():
    plain, prox = _model(), _model()
    _train(plain, [])
    _train(prox, [FedProx(FedProx.Settings.neutral())])
    for a, b in zip(plain.parameters(), prox.parameters()):
        assert torch.equal(a, b)


def test_fedprox_pulls_towards_global():
    free, prox = _model(), _model()
    start = [p.detach().clone() for p in free.parameters()]
    _train(free, [], steps=8)
    _train(prox, [FedProx(FedProx.Settings(mu=10.0))], steps=8)
    dist = lambda m: sum(float(((p - s) ** 2).sum()) for p, s in zip(m.parameters(), start))  # noqa: E731
    assert dist(prox) < dist(free)


def test_fedprox_term_value():
    model = _model()
    plug = FedProx(FedProx.Settings(mu=2.0))
    x, y = _data()
    st = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    loss_fn=torch.nn.functional.cross_entropy, x=x, y=y, device=x.device, round=1,
                    client_id=0, seed=0, rng=torch.Generator(), config={}, batch_size=4, epochs=1)
    plug.on(Event.ROUND_START, st)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    plug.on(Event.LOSS, st)
    n = sum(p.numel() for p in model.parameters())
    assert float(st.loss_terms["fedprox"]) == pytest.approx(0.5 * 2.0 * n)


def test_server_mu_overrides_setting():
    plug = FedProx(FedProx.Settings(mu=0.0))
    m = _model()
    _train(m, [plug], steps=1, config={"proximal-mu": 0.5})
    assert plug._mu == 0.5


@dataclass
class _Counter:
    n: int = 0


def test_plugin_state_persists_across_rounds(tmp_path):
    """A plugin's state_dict round-trips through Flower's context.state between rounds."""
    from dataclasses import dataclass as dc

    from fedsim.clients.plugin_api import PLUGINS, register_plugin
    from fedsim.engines.local import run_local
    from tests.conftest import tiny

    if "count_rounds" not in PLUGINS:
        @register_plugin
        class CountRounds(ClientPlugin):
            name = "count_rounds"
            events = frozenset({Event.ROUND_START, Event.ROUND_END})

            @dc(frozen=True)
            class Settings(ClientPlugin.Settings):
                pass

            def __init__(self, settings=None):
                super().__init__(settings)
                self.rounds = 0

            def on(self, event, state):
                if event is Event.ROUND_END:
                    self.rounds += 1
                    state.metrics["count_rounds/rounds"] = float(self.rounds)

            def state_dict(self):
                return {"rounds": self.rounds}

            def load_state_dict(self, d):
                self.rounds = int(d["rounds"])

    from fedsim.results import read_jsonl

    run_local(tiny(["run.rounds=3", 'client.plugins=["count_rounds"]']), tmp_path)
    rows = read_jsonl(tmp_path / "clients.jsonl")
    last = [r for r in rows if r["round"] == 3]
    assert all(r["count_rounds/rounds"] == 3.0 for r in last)
