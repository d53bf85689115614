"""No all-node query: the partition of a node comes from its node config on the local and Ray engines,
and any Flower ClientApp (a vanilla one that answers only ``train``) serves as fedsim's clients.

The Ray engine learns Flower's own ``{node id: partition id}`` mapping from the simulation's node
registration (``fedsim.engines.ray``); the tests here check that capture without Ray (fast), that a
vanilla ClientApp trains under a fedsim FedAvg with fedsim's seeded sample on the local engine, and
(slow) the same on Ray with not one ``query.*`` message sent and the local engine's numbers. A scenario
names such an app as ``run.client_app`` (``module:object``): a bad name, or a scenario asking fedsim's
client side for what another app would not do, is refused before the run, and so is another app on an
insecure deployment (whose server must ask each node ``query.whoami``).
"""

from __future__ import annotations

import json
import pickle
import re

import pytest

from fedsim.engines.local import run_local
from fedsim.results import read_jsonl
from tests.conftest import tiny
from tests.fedsim.engines.vanilla_app import build_vanilla_app


def _sampled(run_dir) -> list[tuple[int, int, str]]:
    return sorted((c["round"], c["client"], c["status"]) for c in read_jsonl(run_dir / "clients.jsonl"))


def _scenario():
    return tiny(["run.rounds=3", "data.num_clients=6", "strategy.fraction_train=0.5"])


def test_capture_publishes_flowers_own_mapping_and_restores_the_runtime():
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    from fedsim.engines.ray import NodeBoard, SimulationGrid, _capture_node_partitions

    original = vce_api._register_nodes
    board = NodeBoard()
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    with _capture_node_partitions(board):
        assert vce_api._register_nodes is not original
        mapping = vce_api._register_nodes(num_nodes=5, state_factory=factory)
    assert vce_api._register_nodes is original
    assert board.mapping == mapping and sorted(mapping.values()) == [0, 1, 2, 3, 4]
    assert {n.node_id for n in factory.state().get_node_info(node_ids=list(mapping))} == set(mapping)

    class Inner:
        def get_node_ids(self):
            return list(mapping)

        def push_messages(self, msgs):
            return ["pushed"]

    grid = SimulationGrid(Inner(), board)
    assert grid.node_partitions == mapping and grid.push_messages([]) == ["pushed"]
    with pytest.raises(RuntimeError), _capture_node_partitions(NodeBoard()):
        raise RuntimeError("the simulation failed")
    assert vce_api._register_nodes is original


def test_the_scenario_handle_pickles_as_text_and_unpickles_to_one_object():
    from fedsim.clients.client_app import ScenarioHandle

    scenario = _scenario()
    blob = pickle.dumps(ScenarioHandle(scenario))
    assert b"pydantic" not in blob and len(blob) < 4096
    a, b = pickle.loads(blob), pickle.loads(blob)
    assert a is b  # one handle per process: a Ray actor keeps one client runtime
    assert a.scenario.to_dict() == scenario.to_dict()


def test_a_vanilla_client_app_trains_under_fedsim_fedavg_on_the_local_engine(tmp_path):
    seen: list[tuple[str, int]] = []
    scenario = _scenario()
    summary = run_local(scenario, tmp_path / "vanilla", client_app=build_vanilla_app(seen))
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert {t for t, _ in seen} == {"train"}  # no query.whoami, no other message
    rows = read_jsonl(tmp_path / "vanilla" / "metrics.jsonl")
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert all(r["num-clients"] == 3 for r in rows[1:])
    # fedsim's seeded sample, whatever the ClientApp: the same clients as fedsim's own app trains
    run_local(scenario, tmp_path / "fedsim")
    assert _sampled(tmp_path / "vanilla") == _sampled(tmp_path / "fedsim")
    assert sorted((r, p) for r, p, _ in _sampled(tmp_path / "vanilla")) == sorted(
        (i // 3 + 1, p) for i, (_, p) in enumerate(seen))


@pytest.mark.slow
def test_a_vanilla_client_app_on_ray_with_no_query_and_the_local_engine_numbers(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from fedsim.engines import ray as ray_engine

    sent: list[str] = []
    original = ray_engine.SimulationGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        messages = list(messages)
        sent.extend(m.metadata.message_type for m in messages)
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(ray_engine.SimulationGrid, "send_and_receive", recording)
    scenario = _scenario()
    local = run_local(scenario, tmp_path / "local", client_app=build_vanilla_app())
    ray = ray_engine.run_ray(scenario, tmp_path / "ray", client_app=build_vanilla_app())
    assert ray["status"] == "completed" and ray["rounds_completed"] == 3
    assert sent and set(sent) == {"train"}  # seeded sampling mapped onto node ids without a query
    assert _sampled(tmp_path / "ray") == _sampled(tmp_path / "local")
    assert ray["final"]["test_loss"] == pytest.approx(local["final"]["test_loss"], abs=1e-6)


# ------------------------------------------------------------------ run.client_app: naming the clients' app
NAMED = "tests.fedsim.engines.vanilla_app:named_app"


def test_a_client_app_named_in_the_scenario_serves_the_local_engine(tmp_path):
    from sklearn.datasets import load_digits

    from tests.fedsim.engines import vanilla_app

    vanilla_app.SEEN.clear()
    summary = run_local(tiny(["run.rounds=2", "data.num_clients=6", "strategy.fraction_train=0.5",
                              f'run.client_app="{NAMED}"']), tmp_path / "run")
    assert summary["status"] == "completed" and summary["client_app"] == NAMED
    assert summary["vectorized"]["used"] is False and "not fedsim's" in summary["vectorized"]["reason"]
    assert vanilla_app.SEEN and {t for t, _ in vanilla_app.SEEN} == {"train"}  # no query.whoami
    clients = read_jsonl(tmp_path / "run" / "clients.jsonl")
    sizes = {p: len(load_digits().target[p::6]) for p in range(6)}  # the vanilla app's own split
    assert len(clients) == 6 and all(c["status"] == "ok" for c in clients), clients  # echoed partitions agree
    assert all(c["num_examples"] == sizes[c["client"]] for c in clients)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["client_app"] == NAMED
    assert run_local(tiny(), tmp_path / "own")["client_app"] == "fedsim"


@pytest.mark.parametrize("name, words", [
    ("tests.fedsim.engines.no_such_module:app", "cannot be imported"),
    ("tests.fedsim.engines.vanilla_app:nope", "has no object 'nope'"),
    ("tests.fedsim.engines.vanilla_app:SEEN", "gives a list, not a flwr.clientapp.ClientApp"),
    ("os:getcwd", "gives a str, not a flwr.clientapp.ClientApp"),
    ("not a name", "should match pattern"),
])
def test_a_bad_client_app_name_is_a_config_error_before_the_run(tmp_path, name, words):
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match=words) as err:
        run_local(tiny([f'run.client_app="{name}"']), tmp_path)
    assert err.value.key == "run.client_app"
    assert not (tmp_path / "summary.json").exists()  # refused before anything ran


@pytest.mark.parametrize("overrides, words", [
    (["strategy.name=fedprox"], "client plugins ['fedprox']"),
    (["faults.crash_clients=[0]"], "faults.crash_clients"),
    (["data.label_noise=0.2"], "data.label_noise"),
    (["strategy.name=signsgd"], "'train.noisy_gradient' messages"),
])
def test_fedsim_client_side_asked_of_another_app_is_refused(tmp_path, overrides, words):
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        run_local(tiny([f'run.client_app="{NAMED}"', *overrides]), tmp_path)
    assert err.value.key == "run.client_app" and not (tmp_path / "summary.json").exists()
    with pytest.raises(ConfigError, match=re.escape(words)):  # a ClientApp object from Python too
        run_local(tiny(overrides), tmp_path, client_app=build_vanilla_app())


def test_an_insecure_deployment_refuses_another_client_app_before_starting_anything(tmp_path, monkeypatch):
    import fedsim.engines.deploy as deploy
    from fedsim.errors import ConfigError

    monkeypatch.setattr(deploy.tempfile, "mkdtemp", lambda *a, **k: pytest.fail("a federation was started"))
    scen = tiny(["data.num_clients=2", "deploy.insecure=true", f'run.client_app="{NAMED}"'])
    with pytest.raises(ConfigError, match="query.whoami") as err:
        deploy.run_deploy(scen, tmp_path / "run", nodes=2)
    assert err.value.key == "deploy.insecure" and "deploy.insecure = false" in err.value.hint


def test_the_deploy_app_command_carries_node_partitions_and_needs_them_for_another_app(tmp_path):
    import tomllib

    import tomli_w

    from fedsim.engines.deploy import _main
    from fedsim.errors import ConfigError
    from tests.conftest import TINY

    scen = tmp_path / "s.toml"
    scen.write_text(tomli_w.dumps(TINY))
    base = ["app", str(scen), "--out", str(tmp_path / "run"), "--set", f'run.client_app="{NAMED}"']
    with pytest.raises(ConfigError, match="query.whoami") as err:
        _main([*base, "--app-dir", str(tmp_path / "a")])
    assert err.value.key == "--node-partitions" and not (tmp_path / "a").exists()
    with pytest.raises(ConfigError) as err:
        _main([*base, "--app-dir", str(tmp_path / "a"), "--node-partitions", "12:0/2,12:1/2"])
    assert err.value.key == "run-config.node-partitions"
    assert _main([*base, "--app-dir", str(tmp_path / "b"), "--node-partitions", " 99:1/2, 12:0/2"]) == 0
    config = tomllib.loads((tmp_path / "b" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config["node-partitions"] == "12:0/2,99:1/2"
    assert tomllib.loads(config["scenario"])["run"]["client_app"] == NAMED
