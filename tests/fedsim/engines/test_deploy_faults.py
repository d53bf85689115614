"""The deployment engine under faults: an impostor node, a ServerApp that fails, a client process that
dies. Real SuperLinks and SuperNodes over gRPC on 127.0.0.1, as in ``test_deploy.py`` (a file of its own
so that the two files' minute-long deployments can run on two test workers at once)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedsim.errors import EngineError, FedSimError, QuorumError
from fedsim.results import read_jsonl
from tests.fedsim.engines.test_deploy import _assert_clean, _check_completed, _scenario, needs_openssl  # skips
                                                                     # this module too if Flower is missing
import fedsim.engines.deploy as deploy  # noqa: E402
from fedsim.engines.deploy import run_deploy  # noqa: E402
from fedsim.engines.processes import make_node_key  # noqa: E402

pytestmark = pytest.mark.slow


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
