"""The step plugin (clients/plugins/step.py): the chain replaces the optimizer step, reproduces
torch.optim where it should, persists its state through context.state, and refuses what it cannot honour."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsim.clients.plugin_api import PluginStack, build_plugins, make_settings
from fedsim.clients.plugins.step import Step
from fedsim.clients.tasks import ClientCall
from fedsim.clients.trainer import train_local
from fedsim.errors import ConfigError
from fedsim.models import build_model
from tests.clients.plugins.loop_helpers import data, run_round, weights
from tests.conftest import tiny


def _step(transforms, **kw):
    return Step(make_settings(Step, {"transforms": transforms, **kw}))


def _train(cfg_overrides, plugins, *, steps=6, rounds=1, model=None):
    x, y = data()
    s = tiny([f"client.max_steps={steps}", "client.batch_size=16", *cfg_overrides])
    model = model or build_model(s.model, (64,), 10, 0)
    for r in range(rounds):
        train_local(model, x, y, s.client, PluginStack(plugins), round=r + 1, client_id=0, seed=0,
                    rng=torch.Generator().manual_seed(r), config={})
    return model


def test_neutral_chain_is_the_plain_loop_bit_for_bit():
    plain, _, _ = run_round([])
    with_step, res, _ = run_round([Step(Step.Settings.neutral())])
    assert weights(plain) == weights(with_step)
    assert res.steps == 4


@pytest.mark.parametrize("client, chain", [
    (['client.optimizer="adam"', "client.lr=0.01"], ["adam"]),
    (["client.momentum=0.9"], ["momentum"]),
    (["client.weight_decay=0.01"], [{"name": "weight_decay", "rate": 0.01}, "sgd"]),
])
def test_chains_reproduce_torch_optimizers(client, chain):
    ref = _train(client, [])
    lr = [c for c in client if c.startswith("client.lr")]
    got = _train(lr, [_step(chain)])
    for a, b in zip(ref.state_dict().values(), got.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_learning_rate_is_read_at_every_step():
    from fedsim.clients.plugin_api import Event
    from tests.clients.plugins.loop_helpers import Recorder

    def freeze(event, state):
        state.optimizer.param_groups[0]["lr"] = 0.0

    x, y = data()
    s = tiny(["client.max_steps=3", "client.batch_size=16"])
    model = build_model(s.model, (64,), 10, 0)
    before = weights(model)
    stack = PluginStack([_step(["adam"]), Recorder(freeze, [Event.BEFORE_STEP])])
    train_local(model, x, y, s.client, stack, round=1, client_id=0, seed=0, rng=torch.Generator().manual_seed(0),
                config={})
    assert weights(model) == before


def test_a_different_chain_changes_the_result():
    assert weights(_train([], [_step(["sign"])])) != weights(_train([], [_step(["sgd"])]))


@pytest.fixture
def task_identity():
    """Flower stamps a new Message with the process's run/task ids: set them, as a ClientApp has."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _call(scenario, context, round_):
    runtime = type("Runtime", (), {"scenario": scenario})()
    msg = Message(RecordDict({"config": ConfigRecord({"plugins": "step", "server-round": round_})}),
                  dst_node_id=0, message_type="train")
    return ClientCall(runtime, msg, context)


FRUGAL = ['{name = "frugal", update_gap = 3}', '{name = "frugal", projection = "blockwise", density = 0.5, '
          'update_gap = 3}', '{name = "dct_lowrank", update_gap = 3}']


@pytest.mark.parametrize("reset, second", [(False, FRUGAL[0]), (False, FRUGAL[1]), (False, FRUGAL[2]),
                                           (True, FRUGAL[0])])
def test_state_persists_across_rounds_through_context_state(reset, second, task_identity):
    s = tiny(['client.plugins=["step"]', f'client.step.transforms=["adam", {second}]',
              f"client.step.reset_each_round={str(reset).lower()}", "client.max_steps=4", "client.batch_size=16"])
    context = Context(run_id=0, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    x, y = data()
    model = build_model(s.model, (64,), 10, 0)
    saved = None
    for r in (1, 2):
        call = _call(s, context, r)
        stack = call.plugins()
        plugin = stack.plugins[0]
        if r == 2 and not reset:  # what came back from context.state is what was saved
            assert {f"t/{k}" for k in plugin._loaded} == set(saved)
            for k, v in saved.items():
                assert v.numpy().dtype == plugin._loaded[k[2:]].dtype and (v.numpy() == plugin._loaded[k[2:]]).all(), k
        train_local(model, x, y, s.client, stack, round=r, client_id=0, seed=0,
                    rng=torch.Generator().manual_seed(r), config={})
        call.save_plugins(stack)
        saved = plugin.state_dict()
    adam, frugal = plugin.transform_state["0"], plugin.transform_state["1"]
    assert int(adam["count"]) == (4 if reset else 8)  # step counters continue across rounds
    assert int(frugal["count"]) == (4 if reset else 8) and int(frugal["inner"]) == (1 if reset else 2)
    assert (saved == {}) == reset
    assert (not any(k.startswith("plugin.step") for k in context.state.array_records)) == reset


def test_settings_and_scenarios_it_cannot_honour_are_refused_before_the_run():
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["step"]', "client.momentum=0.9"])
    assert e.value.key == "client.optimizer"
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["step"]', 'client.step.transforms=[{name = "frugal", density = 1.5}]'])
    assert e.value.key == "client.step.transforms[0].density"
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["step"]', 'client.step.transforms="adam"'])
    assert e.value.key == "client.step.transforms"
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["step"]', 'client.step.transforms=["gns_newton"]', "model.dropout=0.1"])
    assert e.value.key == "client.step.transforms[0]"
    with pytest.raises(ConfigError) as e:
        tiny(['client.plugins=["step", "fedprox"]', 'client.step.transforms=["gns_newton"]'])
    assert e.value.key == "client.step.transforms" and "fedprox" in str(e.value)
    with pytest.raises(ConfigError) as e:  # dp_sgd owns the step too
        tiny(['client.plugins=["step"]', 'privacy.mechanism="dp-sgd"', "privacy.noise_multiplier=1.0"])
    assert e.value.key == "client.plugins"


def test_gns_newton_and_normalized_gd_through_the_loop():
    from fedsim.data.separable import separable

    d = separable(0, 0.2, num_samples=200, dim=6, margin=0.05)
    x, y = torch.as_tensor(d.x_train), torch.as_tensor(d.y_train)
    s = tiny(["client.max_steps=6", "client.batch_size=200", "client.epochs=6", "client.lr=1.0"])
    s.model.name = "logreg"
    losses = {}
    for name in ("sgd", "normalized_gd", "gns_newton"):
        model = build_model(s.model, (6,), 2, 0)
        stack = build_plugins(["step"], lambda _: {"transforms": [name]})
        res = train_local(model, x, y, s.client, stack, round=1, client_id=0, seed=0,
                          rng=torch.Generator().manual_seed(0), config={})
        with torch.no_grad():
            losses[name] = float(torch.nn.functional.cross_entropy(model(x), y))
        if name == "gns_newton":
            assert res.metrics["step/gns_newton.accepted"] == 6 and res.metrics["step/gns_newton.rejected"] == 0
    assert losses["gns_newton"] < losses["normalized_gd"] < losses["sgd"]
