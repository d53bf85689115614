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
import time
from pathlib import Path

import pytest

from fedsim.config import scenario_from_dict
from fedsim.errors import EngineError, FedSimError, QuorumError
from fedsim.results import read_jsonl

pytestmark = pytest.mark.slow

_BIN = Path(sys.executable).parent
if not (_BIN / "flower-superlink").exists() and shutil.which("flower-superlink") is None:
    pytest.skip("flower-superlink is not installed in this environment (pip install 'flwr[simulation]==1.39.0')",
                allow_module_level=True)

import fedsim.engines.deploy as deploy  # noqa: E402
from fedsim.engines.deploy import leftover_processes, run_deploy  # noqa: E402
from fedsim.engines.processes import make_node_key  # noqa: E402

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


@needs_openssl
def test_an_unregistered_impostor_is_refused_and_a_duplicate_claimant_recorded(tmp_path, monkeypatch):
    """Issue 9: a SuperNode with the CA certificate, its own key and ``partition-id=0`` must not serve as
    client 0. With node authentication it cannot even activate; a *registered* node that claims
    partition 0 as well (an operator's mistake) is refused by the ServerApp and recorded."""
    impostor_pub: list[bytes] = []

    class WithIntruders(deploy.LocalFederation):
        def start(self):
            super().start()
            claim = {"partition-id": 0, "num-partitions": self.nodes}
            key = self.workdir / "impostor" / "key"
            impostor_pub.append(_pem_public_key(make_node_key(key)))
            self.add_supernode("impostor", claim, private_key=key)  # never registered
            dup = self.workdir / "keys" / "duplicate"
            self.register_key(make_node_key(dup), "duplicate-0")
            self.add_supernode("duplicate-0", claim, private_key=dup)
            impostor = next(p for p in self.procs if p.name == "impostor").popen
            deadline = time.monotonic() + 90  # both have tried to join before the run starts
            while (impostor.poll() is None or len(self.activated()) < 3) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert impostor.poll() not in (None, 0), "the impostor SuperNode was not refused"

    monkeypatch.setattr(deploy, "LocalFederation", WithIntruders)
    out = tmp_path / "run"
    summary = run_deploy(_scenario(), out, nodes=2)
    _check_completed(summary, out, activations=3)
    registered = summary["deploy"]["registered_nodes"]
    link_log = (out / "deploy-logs" / "superlink.log").read_text()
    key_line = impostor_pub[0].decode().splitlines()[1]  # the SuperLink logs the key it refused
    refusals = [ln for ln in link_log.splitlines() if key_line in ln]
    assert refusals and all("No SuperNode found with the given public key" in ln for ln in refusals), refusals
    records = read_jsonl(out / "clients.jsonl")
    assert {r["node_id"] for r in records} <= set(registered.values()), "the impostor never appears"
    [client0] = [r for r in records if r["client"] == 0]
    assert client0["status"] == "ok" and client0["node_id"] == registered["supernode-0"], "the real client 0 trains"
    [dup] = [r for r in records if r["status"] == "duplicate-partition"]
    assert dup["node_id"] == registered["duplicate-0"] and dup["client"] is None
    assert str(registered["supernode-0"]) in dup["reason"] and str(registered["duplicate-0"]) in dup["reason"]
    _assert_clean(summary["deploy"]["scratch_dir"])


def _pem_public_key(openssh_pub: Path) -> bytes:
    """The public key as the SuperLink logs it (PEM SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization as ser

    key = ser.load_ssh_public_key(openssh_pub.read_bytes())
    return key.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)


@needs_openssl
def test_failed_serverapp_raises_its_error(tmp_path, monkeypatch):
    # 3 clients needed, 2 nodes started: the ServerApp raises QuorumError after run.round_timeout,
    # Flower marks the run finished:failed (while `flwr run --stream` would have exited 0).
    scen = _scenario(data={"num_clients": 3}, strategy={"min_train_clients": 3}, run={"round_timeout": 2.0})
    out = tmp_path / "run"
    import fedsim.engines.deploy as deploy

    scratch: list[str] = []
    real_mkdtemp = deploy.tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        scratch.append(real_mkdtemp(*args, **kwargs))
        return scratch[-1]

    monkeypatch.setattr(deploy.tempfile, "mkdtemp", recording_mkdtemp)
    with pytest.raises(FedSimError) as err:
        run_deploy(scen, out, nodes=2)
    # the ServerApp's typed error stops the engine with the same class, or an EngineError with Flower's status
    assert type(err.value) is QuorumError or (type(err.value) is EngineError and "finished:failed" in str(err.value))
    # refused before round 1 (fedsim.server.check_partitions) or, if the nodes came in later, by round 1's quorum
    assert "of the scenario's 3 partitions" in str(err.value) or "of the 3 clients needed were reachable" in \
        str(err.value)
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped: QuorumError"
    assert (out / "deploy-logs" / "superlink.log").exists()
    assert len(scratch) == 1
    _assert_clean(scratch[0])


@needs_openssl
def test_a_client_process_that_dies_does_not_stop_the_run(tmp_path):
    """Client 1's ClientApp process exits abruptly (os._exit) in round 1: the round completes with
    client 0 and the failure is recorded with the client id."""
    out = tmp_path / "run"
    s = _scenario(faults={"crash_clients": [1], "crash_mode": "exit"}, run={"quorum": 0.5})
    summary = run_deploy(s, out, nodes=2)
    assert summary["status"] == "completed"
    clients = {c["client"]: c for c in read_jsonl(out / "clients.jsonl")}
    assert clients[0]["status"] == "ok"
    assert clients[1]["status"] in ("error", "timeout") and clients[1]["reason"]
    _assert_clean(summary["deploy"]["scratch_dir"])


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
