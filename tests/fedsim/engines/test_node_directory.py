"""No all-node query: the partition of a node comes from its node config on the local and Ray engines,
and any Flower ClientApp (a vanilla one that answers only ``train``) serves as fedsim's clients.

The Ray engine learns Flower's own ``{node id: partition id}`` mapping from the simulation's node
registration (``fedsim.engines.ray``); the tests here check that capture without Ray (fast), that a
vanilla ClientApp trains under a fedsim FedAvg with fedsim's seeded sample on the local engine, and
(slow) the same on Ray with not one ``query.*`` message sent and the local engine's numbers.
"""

from __future__ import annotations

import pickle

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
