"""The deployment engine end to end: a real SuperLink and SuperNodes over gRPC on 127.0.0.1.

Secure by default: TLS and SuperNode authentication (keys registered before the run). Slow (each run
starts ~4 processes and one ``flwr-clientapp`` process per message, ~10 s per message exchange); run
with ``pytest -m slow tests/fedsim/engines/test_deploy.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from fedsim.config import scenario_from_dict
from fedsim.errors import EngineError
from fedsim.results import read_jsonl

pytestmark = pytest.mark.slow

_BIN = Path(sys.executable).parent
if not (_BIN / "flower-superlink").exists() and shutil.which("flower-superlink") is None:
    pytest.skip("flower-superlink is not installed in this environment (pip install 'flwr[simulation]==1.39.0')",
                allow_module_level=True)

import fedsim.engines.deploy as deploy  # noqa: E402
from fedsim.engines.deploy import leftover_processes, run_deploy  # noqa: E402

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="TLS (the default) needs openssl")

TINY = {
    "run": {"name": "deploy-tiny", "rounds": 1, "progress": False},
    "data": {"num_clients": 2, "partitioner": "iid"},
    "model": {"hidden": [16]},
    "client": {"max_steps": 5},
    "strategy": {"min_train_clients": 2},
}


def _scenario(**sections):
    raw = {k: dict(v) for k, v in TINY.items()}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return scenario_from_dict(raw)


def _assert_clean(scratch_dir: str) -> None:
    """No process of that federation (they all have FLWR_HOME under its scratch dir) is alive."""
    left = leftover_processes(scratch_dir)
    assert left == [], f"processes left alive after the run: {left}"
    assert not Path(scratch_dir).exists(), "the scratch directory was not removed"


def _activated(link_log: str) -> list[int]:
    return [int(n) for n in re.findall(r"\[Fleet\.ActivateNode\] Activated node_id=(\d+)", link_log)]


def _check_completed(summary: dict, out: Path, activations: int = 2) -> None:
    assert summary["status"] == "completed"
    assert summary["engine"] == "deploy"
    assert summary["deploy"]["status"] == "finished:completed"
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    rounds = [r["round"] for r in read_jsonl(out / "metrics.jsonl") if r["round"] >= 1]
    assert rounds == [1]
    clients = [c for c in read_jsonl(out / "clients.jsonl") if c["client"] is not None]
    assert sorted(c["client"] for c in clients) == [0, 1]
    assert all(c["status"] == "ok" for c in clients), clients
    link_log = (out / "deploy-logs" / "superlink.log").read_text()
    assert "Starting Fleet API (gRPC-rere) on 127.0.0.1:" in link_log
    assert len(_activated(link_log)) == activations
    assert "[Fleet.PushMessages]" in link_log  # the replies came over the gRPC Fleet API
    assert "/v1/fleet/" not in link_log  # ...and not over an HTTP Fleet API
    assert (out / "deploy-logs" / "serverapp.log").exists()


@needs_openssl
def test_deploy_is_secure_by_default_and_a_named_vanilla_client_app_serves_it_without_any_query(
        tmp_path, monkeypatch):
    """TLS and registered SuperNodes by default. With node authentication the engine knows every node id
    before the run and hands the ServerApp ``{node id: partition}`` in the run config, so a vanilla
    ClientApp (``run.client_app``, run by fedsim's ClientApp in every ``flwr-clientapp`` process) serves
    (issue 14): no ``query.whoami`` reaches it, and each client's reply comes from the vanilla app on
    that client's own partition. (One deployment checks both: each costs about a minute.)"""
    from sklearn.datasets import load_digits

    named = "tests.fedsim.engines.vanilla_app:named_app"
    log = tmp_path / "vanilla.log"  # every message the vanilla app gets, one line each (its processes append)
    monkeypatch.setenv("VANILLA_APP_LOG", str(log))
    out = tmp_path / "run"
    summary = run_deploy(_scenario(run={"client_app": named}), out, nodes=2)
    _check_completed(summary, out)
    dep = summary["deploy"]
    assert dep["tls"] is True and dep["node_auth"] is True
    registered = dep["registered_nodes"]
    assert sorted(registered) == ["supernode-0", "supernode-1"]
    link_log = (out / "deploy-logs" / "superlink.log").read_text()
    assert link_log.count("[ControlServicer.RegisterNode] Created node_id=") == 2
    assert sorted(_activated(link_log)) == sorted(registered.values()), "the nodes that joined hold registered keys"
    assert "Uvicorn running on https://127.0.0.1:" in link_log  # the Control API speaks TLS too
    assert summary["client_app"] == named and dep["node_directory"] == "run-config"
    assert sorted(log.read_text().splitlines()) == ["train 0", "train 1"]  # one round; nothing else was sent
    sizes = [len(load_digits().target[p::2]) for p in (0, 1)]  # the vanilla app's own split: 899, 898
    for c in read_jsonl(out / "clients.jsonl"):
        assert c["node_id"] == registered[f"supernode-{c['client']}"] and c["num_examples"] == sizes[c["client"]]
    _assert_clean(dep["scratch_dir"])


def test_deploy_insecure_only_when_asked(tmp_path):
    out = tmp_path / "run"
    summary = run_deploy(_scenario(deploy={"insecure": True}), out, nodes=2)
    _check_completed(summary, out)
    dep = summary["deploy"]
    assert dep["tls"] is False and dep["node_auth"] is False and dep["registered_nodes"] == {}
    assert "Uvicorn running on http://127.0.0.1:" in (out / "deploy-logs" / "superlink.log").read_text()
    _assert_clean(dep["scratch_dir"])


def test_an_activated_node_without_a_registered_key_fails_the_run(tmp_path):
    """The check behind "every node that took part held a registered key", on a SuperLink log."""
    fed = deploy.LocalFederation(nodes=2, workdir=tmp_path)
    fed.logs.mkdir(parents=True)
    fed.registered = {"supernode-0": 11, "supernode-1": 12}
    fed.superlink_log.write_text("INFO :      [Fleet.ActivateNode] Activated node_id=11\n"
                                 "INFO :      [Fleet.ActivateNode] Activated node_id=12\n")
    fed.check_only_registered()
    with fed.superlink_log.open("a") as log:
        log.write("INFO :      [Fleet.ActivateNode] Activated node_id=99\n")
    with pytest.raises(EngineError, match=r"\[99\] were activated"):
        fed.check_only_registered()
    deploy.LocalFederation(nodes=2, workdir=tmp_path, insecure=True).check_only_registered()  # nothing to check
