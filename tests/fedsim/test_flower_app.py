"""The Flower app (issue 14, items 1-2): the run config names the scenario (built-in name, path in the app
directory, or TOML text) and its overrides; ServerApp and ClientApps build the same scenario from it;
bad keys are typed errors naming ``run-config.<key>``; a federation with fewer nodes than partitions is a
warning naming them, or refused with ``run.require_all_partitions``; a run whose every round fails never
ends ``completed``. The slow test runs ``flwr run`` itself on a local simulation federation."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedsim.app_config import scenario_from_run_config, scenario_text, split_overrides
from fedsim.config import load_scenario
from fedsim.errors import ConfigError, FailedRoundError, QuorumError
from fedsim.results import read_jsonl
from tests.conftest import TINY, tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, items", [
    ("", []),
    ("run.rounds=2", ["run.rounds=2"]),
    ("run.rounds=2; client.lr=0.1", ["run.rounds=2", "client.lr=0.1"]),
    ("run.rounds=2 client.lr=0.1;", ["run.rounds=2", "client.lr=0.1"]),
    ('client.plugins=["fedprox", "x"] run.seed=1', ['client.plugins=["fedprox", "x"]', "run.seed=1"]),
    ('run.name="a b"', ['run.name="a b"']),
])
def test_overrides_split_on_semicolons_or_spaces_before_a_key(text, items):
    assert split_overrides(text) == items


def test_scenario_by_builtin_name_or_path_is_the_same_scenario():
    want = load_scenario(ROOT / "scenarios" / "default.toml")
    for ref in ("default", "default.toml", "scenarios/default.toml", str(ROOT / "scenarios" / "default.toml")):
        assert scenario_from_run_config({"scenario": ref}) == want, ref


def test_overrides_apply_as_set_does():
    got = scenario_from_run_config({"scenario": "default", "overrides": "run.rounds=2; client.lr=0.2 run.seed=5"})
    assert (got.run.rounds, got.client.lr, got.run.seed) == (2, 0.2, 5)
    assert got == load_scenario(ROOT / "scenarios" / "default.toml", ["run.rounds=2", "client.lr=0.2", "run.seed=5"])


def test_a_relative_path_is_found_in_the_flower_app_directory(tmp_path, monkeypatch):
    app = tmp_path / "app"
    (app / "exp").mkdir(parents=True)
    (app / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (app / "exp" / "mine.toml").write_text(tomli_w_dumps({**TINY, "run": {**TINY["run"], "rounds": 7}}))
    monkeypatch.chdir(tmp_path)                       # not the app directory: found through sys.path
    with pytest.raises(ConfigError, match="run-config.scenario"):
        scenario_text({"scenario": "exp/mine.toml"})
    monkeypatch.syspath_prepend(str(app))             # as Flower does before loading the app
    assert scenario_from_run_config({"scenario": "exp/mine.toml"}).run.rounds == 7


def test_scenario_as_toml_text_is_taken_as_it_is():
    text = tomli_w_dumps(TINY)
    assert scenario_from_run_config({"scenario": text}).data.num_clients == 4


@pytest.mark.parametrize("config, key, words", [
    ({}, "run-config.scenario", "is empty"),
    ({"scenario": "  "}, "run-config.scenario", "is empty"),
    ({"scenario": "no_such_scenario"}, "run-config.scenario", "not a built-in scenario"),
    ({"scenario": "scenarios/nope.toml"}, "run-config.scenario", "default"),       # the built-in names listed
    ({"scenario": 3}, "run-config.scenario", "must be a string"),
    ({"scenario": "default", "overrides": "run.rounds=zero"}, "run-config.overrides", "run.rounds"),
    ({"scenario": "default", "overrides": "rounds"}, "run-config.overrides", "section.key=value"),
    ({"scenario": "default", "overrides": "client.rounds=3"}, "run-config.overrides", "client"),
    ({"scenario": "default", "num-server-rounds": 3}, "run-config.num-server-rounds", "not a fedsim run-config"),
])
def test_bad_run_config_is_a_typed_error_naming_the_key(config, key, words):
    with pytest.raises(ConfigError) as err:
        scenario_text(config)
    assert err.value.key.startswith(key) and words in str(err.value), str(err.value)


def test_a_broken_scenario_file_is_a_config_error_not_a_toml_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        scenario_text({"scenario": str(bad)})
    assert err.value.key.startswith("run-config.scenario")
    bad.write_text("[run]\nrounds = -1\n")
    with pytest.raises(ConfigError, match="run.rounds") as err:
        scenario_text({"scenario": str(bad)})
    assert err.value.key.startswith("run-config.scenario")


def _flower_app_run(run_config: dict, num_nodes: int):
    """fedsim.flower_app's ServerApp and ClientApp, as ``flwr run`` loads them, on the in-process grid:
    both read the scenario from the run config only."""
    from fedsim.engines.local import LocalGrid
    from fedsim.flower_app import client_app, server_app

    grid = LocalGrid(client_app, num_nodes, run_config=run_config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


def test_the_flower_app_runs_the_run_config_scenario_on_server_and_clients(tmp_path):
    scen = tmp_path / "s.toml"
    scen.write_text(tomli_w_dumps(TINY))
    out = tmp_path / "run"
    _flower_app_run({"scenario": str(scen), "overrides": "run.rounds=3 client.max_steps=3", "out-dir": str(out)}, 4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert summary["partitions_never_trained"] == []
    assert {c["client"] for c in read_jsonl(out / "clients.jsonl") if c["status"] == "ok"} == {0, 1, 2, 3}
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["client"]["max_steps"] == 3 and cfg["meta"]["engine"] == "flwr-run"


def test_fewer_nodes_than_partitions_warns_naming_the_partitions(tmp_path, caplog):
    scen = tmp_path / "s.toml"
    scen.write_text(tomli_w_dumps(TINY))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _flower_app_run({"scenario": str(scen), "out-dir": str(out)}, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["partitions_never_trained"] == [2, 3]
    assert any("partitions 2-3 will never train" in r.getMessage() for r in caplog.records), caplog.text
    assert {c["client"] for c in read_jsonl(out / "clients.jsonl")} == {0, 1}


def test_require_all_partitions_refuses_such_a_federation_before_round_1(tmp_path):
    scen = tmp_path / "s.toml"
    scen.write_text(tomli_w_dumps(TINY))
    out = tmp_path / "run"
    with pytest.raises(QuorumError, match="require_all_partitions") as err:
        _flower_app_run({"scenario": str(scen), "overrides": "run.require_all_partitions=true",
                         "out-dir": str(out)}, 3)
    assert "partitions 3 will never train" in str(err.value) and "num-supernodes=4" in err.value.hint
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped: QuorumError" and summary["rounds_completed"] == 0
    assert read_jsonl(out / "clients.jsonl") == []                               # nothing trained


def test_too_few_nodes_for_a_round_is_refused_even_without_the_option(tmp_path):
    from fedsim.engines.local import run_local

    s = tiny(["strategy.min_train_clients=3"])
    with pytest.raises(QuorumError, match="a round needs 3"):
        run_local(s, tmp_path, grid_hook=lambda g: [g.kill(p) for p in (1, 2)])


def test_a_run_whose_every_round_fails_never_ends_completed(tmp_path):
    from fedsim.engines.local import run_local

    s = tiny(["faults.crash_clients=[0, 1, 2, 3]", 'run.on_failed_round="continue"'])
    with pytest.raises(FailedRoundError, match="every one of the 2 rounds failed") as err:
        run_local(s, tmp_path)
    assert err.value.exit_code == 10
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed: every round failed" and summary["failed_rounds"] == [1, 2]
    assert summary["error_type"] == "FailedRoundError" and summary["rounds_completed"] == 2
    # one good round is a run that trained: "continue" then completes and lists the failed one
    ok = run_local(tiny(["faults.crash_clients=[0, 1, 2, 3]", "faults.crash_rounds=[2]",
                         'run.on_failed_round="continue"']), tmp_path / "b")
    assert ok["status"] == "completed" and ok["failed_rounds"] == [2]


def tomli_w_dumps(data: dict) -> str:
    import tomli_w

    return tomli_w.dumps(data)


# ------------------------------------------------------------------------------------ flwr run .
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_local_superlink(bindir: str, http: int, home: Path, env: dict) -> subprocess.Popen:
    """The SuperLink `flwr run` starts for a ``":local:"`` connection (same command and port), started here
    so the test owns its PID and can wait for it longer than Flower's 15 s on a loaded machine; `flwr run`
    then finds it serving and uses it."""
    log = home / "local-superlink" / "superlink.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(Path(bindir) / "flower-superlink"), "--insecure", "--simulation", "--isolation",
                             "subprocess", "--control-api-address", f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
                             "--host", "127.0.0.1", "--port", str(http), "--log-file", str(log),
                             "--database", str(home / "local-superlink" / "state.db")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise AssertionError(f"the local SuperLink did not start:\n{log.read_text()[-2000:] if log.exists() else ''}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the SuperLink's session (it and the simulation processes it started), SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("flwr", path=str(Path(sys.executable).parent)) is None,
                    reason="the flwr CLI is not installed next to this Python")
def test_flwr_run_dot_completes_the_default_scenario(tmp_path):
    """`flwr run .` in a copy of the project (Flower rewrites pyproject.toml when it migrates the
    federations table), with its own FLWR_HOME and free ports for the local SuperLink of the default
    ``":local:"`` federation (started by the test, see :func:`_start_local_superlink`)."""
    app = tmp_path / "app"
    app.mkdir()
    for name in ("pyproject.toml", "README.md", ".gitignore"):
        shutil.copy(ROOT / name, app / name)
    shutil.copytree(ROOT / "scenarios", app / "scenarios", ignore=shutil.ignore_patterns("__pycache__"))
    http, control = _free_port(), _free_port()
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    out = tmp_path / "run"

    def flwr(*args, timeout=120):
        return subprocess.run([str(Path(bindir) / "flwr"), *args], cwd=app, env=env, capture_output=True,
                              text=True, timeout=timeout)

    link = _start_local_superlink(bindir, http, tmp_path / "home", env)
    try:
        res = flwr("run", ".", "--run-config", f'overrides="run.rounds=2" out-dir="{out}"', "--format", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        found = re.search(r'"run-id":\s*"(\d+)"', res.stdout)     # after Flower's migration notice
        assert found, res.stdout + res.stderr
        run_id = found.group(1)
        conn = tomllib.loads((tmp_path / "home" / "config.toml").read_text())["superlink"]
        assert conn["default"] == "local-simulation"                       # migrated from pyproject.toml
        assert conn["local-simulation"]["options"]["num-supernodes"] == 10
        status, deadline = "", time.monotonic() + 780
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(3)
            ls = flwr("ls", "--run-id", str(run_id), "--format", "json", timeout=60)
            found = re.search(r'"status":\s*"([^"]*)"', ls.stdout)
            status = found.group(1) if found else ""
        log = flwr("log", str(run_id), "--show", timeout=60).stdout
        assert status == "finished:completed", f"{status}\n{log[-3000:]}"
    finally:
        _stop(link)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2, summary
    assert summary["partitions_never_trained"] == [] and summary["final"]["test_accuracy"] > 0.2   # chance: 0.1
    clients = read_jsonl(out / "clients.jsonl")
    assert {c["client"] for c in clients if c["status"] == "ok"} == set(range(10))


def test_flowers_default_two_node_simulation_is_refused_for_a_larger_scenario(tmp_path):
    """As in Flower's simulation: each node claims ``partition-id``/``num-partitions`` of a 2-way split
    (answered to ``query.whoami``), which is no partition of the scenario's 4-way split: refused before
    round 1, each refusal recorded."""
    from fedsim.engines.local import LocalGrid
    from fedsim.flower_app import client_app, server_app

    class FlowerLikeGrid(LocalGrid):
        node_partitions = None  # the server must ask each node, as on Flower's own grids

    scen = tmp_path / "s.toml"
    scen.write_text(tomli_w_dumps(TINY))
    out = tmp_path / "run"
    rc = {"scenario": str(scen), "out-dir": str(out)}
    with pytest.raises(QuorumError, match="partitions 0-3 will never train") as err:
        server_app(FlowerLikeGrid(client_app, 2, run_config=rc),
                   Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    assert "num-partitions=2" in str(err.value)
    refused = read_jsonl(out / "clients.jsonl")
    assert [(r["status"], r["round"], r["client"]) for r in refused] == [("invalid-partition", 0, None)] * 2


# ------------------------------------------------------------------------------------ node directory, client app
NAMED = "tests.fedsim.engines.vanilla_app:named_app"


def test_fedsims_client_app_hands_every_message_to_the_app_the_run_config_names(tmp_path):
    """Under ``flwr run`` the components stay fedsim's: its ClientApp passes each message to the named app."""
    from tests.fedsim.engines import vanilla_app

    scen = tmp_path / "s.toml"
    scen.write_text(tomli_w_dumps(TINY))
    out = tmp_path / "run"
    vanilla_app.SEEN.clear()
    _flower_app_run({"scenario": str(scen), "overrides": f'run.client_app="{NAMED}"', "out-dir": str(out)}, 4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["client_app"] == NAMED
    clients = read_jsonl(out / "clients.jsonl")
    assert clients and all(c["status"] == "ok" for c in clients)  # each reply echoed its node's partition
    assert sorted(vanilla_app.SEEN) == sorted(("train", c["client"]) for c in clients)  # nothing but train


def test_a_bad_client_app_stops_the_flower_app_before_round_1(tmp_path):
    scen = tmp_path / "s.toml"
    scen.write_text(tomli_w_dumps(TINY))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="has no object") as err:
        _flower_app_run({"scenario": str(scen), "overrides": 'run.client_app="os:no_such_app"',
                         "out-dir": str(out)}, 4)
    assert err.value.key == "run.client_app" and not out.exists()


def _simulation(num_nodes: int):
    """Flower's in-memory simulation state and grid, with ``num_nodes`` registered as Flower's runtime does."""
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 11, NOOP_FEDERATION_ID
    factory.state().run_ids[7] = RunRecord(run=run)  # as _main_loop pre-registers the run
    factory.state().task_store[11] = Task(task_id=11, run_id=7)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, vce_api._register_nodes(num_nodes=num_nodes, state_factory=factory)


def test_a_simulation_grid_takes_the_runtimes_own_mapping_once_it_serves():
    """Flower's runtime publishes its ``{node id: partition id}`` to nothing; the grid reads it from the
    runtime's message thread for *its* state only, shows no node before, and sends no message."""
    import threading
    from queue import Queue

    from flwr.server.superlink.fleet.vce import vce_api

    from fedsim.flower_app import SimulationRuntimeGrid, node_directory_grid
    from fedsim.strategies.base import make_strategy

    grid, mapping = _simulation(4)
    other_grid, other = _simulation(4)
    wrapped = node_directory_grid(grid, {})
    assert isinstance(wrapped, SimulationRuntimeGrid)
    assert set(grid.get_node_ids()) == set(mapping)  # registered, but the runtime does not serve yet
    stop = threading.Event()

    def serve(state, nodes):
        t = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, Queue(), nodes, stop), daemon=True)
        t.start()
        return t

    threads = [serve(other_grid.state, other)]  # another simulation in this process: not ours
    try:
        assert list(wrapped.get_node_ids()) == [] and wrapped.node_partitions == {}
        threads.append(serve(grid.state, mapping))
        assert wrapped.node_partitions == mapping and sorted(mapping.values()) == [0, 1, 2, 3]
        assert set(wrapped.get_node_ids()) == set(mapping) and set(wrapped.node_num_partitions.values()) == {4}
        strategy = make_strategy(tiny(data={"num_clients": 4}))
        strategy.discover(wrapped)  # an InMemoryGrid would accept a whoami: none may be sent
        assert strategy.directory == mapping and not strategy.failures and not strategy.unanswered
        larger = make_strategy(tiny(data={"num_clients": 6}))  # Flower's node configs say num-partitions = 4
        larger.discover(wrapped)
        assert larger.directory == {} and {f.kind for f in larger.failures} == {"invalid-partition"}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)


def test_the_grid_keeps_whoami_where_nothing_is_known_and_refuses_a_directory_it_cannot_use():
    from fedsim.engines.local import LocalGrid
    from fedsim.flower_app import client_app, node_directory_grid
    from fedsim.strategies.node_directory import KnownNodesGrid

    class Deployment:  # a SuperLink's grid: no node_partitions
        def get_node_ids(self):
            return [5, 6]

    local = LocalGrid(client_app, 2)
    assert node_directory_grid(local, {}) is local
    plain = Deployment()
    assert node_directory_grid(plain, {}) is plain and node_directory_grid(plain, {"node-partitions": ""}) is plain
    known = node_directory_grid(plain, {"node-partitions": "5:0/2,6:1/2"})
    assert isinstance(known, KnownNodesGrid) and known.node_partitions == {5: 0, 6: 1}
    assert known.get_node_ids() == [5, 6]
    for grid in (local, _simulation(2)[0]):
        with pytest.raises(ConfigError, match="is for deployments") as err:
            node_directory_grid(grid, {"node-partitions": "5:0/2"})
        assert err.value.key == "run-config.node-partitions"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_flower_simulation_maps_its_nodes_from_the_runtime_without_a_query(tmp_path, monkeypatch):
    """A real Flower simulation (``run_simulation`` → ``_main_loop``, Ray), as under ``flwr run .``: the
    ServerApp with the node directory of ``fedsim.flower_app``, fedsim's ClientApp handing every message
    to the vanilla app the scenario names. Not one ``query.*`` is sent, every reply's echoed partition
    agrees with the server's mapping, and the clients and numbers are the local engine's."""
    pytest.importorskip("ray")
    from flwr.simulation import run_simulation
    from flwr.superlink.grid import InMemoryGrid

    from fedsim.clients.client_app import build_client_app
    from fedsim.engines.local import run_local
    from fedsim.engines.ray import backend_config_for
    from fedsim.flower_app import with_node_directory
    from fedsim.server import build_server_app

    sent: list[str] = []
    original = InMemoryGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        messages = list(messages)
        sent.extend(m.metadata.message_type for m in messages)
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(InMemoryGrid, "send_and_receive", recording)
    scen = tiny(["run.rounds=2", "data.num_clients=6", "strategy.fraction_train=0.5", f'run.client_app="{NAMED}"'])
    server = with_node_directory(build_server_app(scen, tmp_path / "sim", engine="flwr-run"), scen)
    run_simulation(server_app=server, client_app=build_client_app(scen), num_supernodes=6,
                   backend_config=backend_config_for(scen))
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["client_app"] == NAMED
    assert sent and set(sent) == {"train"}
    clients = read_jsonl(tmp_path / "sim" / "clients.jsonl")
    assert len(clients) == 6 and all(c["status"] == "ok" for c in clients), clients
    local = run_local(scen, tmp_path / "local")
    assert sorted((c["round"], c["client"]) for c in clients) == sorted(
        (c["round"], c["client"]) for c in read_jsonl(tmp_path / "local" / "clients.jsonl"))
    assert summary["final"]["test_loss"] == pytest.approx(local["final"]["test_loss"], abs=1e-6)
