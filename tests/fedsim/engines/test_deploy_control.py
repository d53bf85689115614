"""The deployment engine's Control API requests from its own process (no `flwr` CLI per request):
the run status as `flwr ls` reports it, giving up when the SuperLink stops answering, and node keys
checked before they are registered. (The real requests are exercised by the deployment tests.)"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.run import Run, RunStatus
from flwr.proto.control_pb2 import ListRunsResponse  # pylint: disable=E0611

import fedsim.engines.deploy as deploy
from fedsim.engines.credentials import make_node_key
from fedsim.engines.processes import LocalFederation
from fedsim.errors import EngineError


class _Client:
    def __init__(self, answers):
        self.answers = list(answers)
        self.asked = 0

    def ListRuns(self, request):  # noqa: N802 - Flower's name
        self.asked += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _listing(run_id: int, status: str, sub: str = "") -> ListRunsResponse:
    from flwr.common.serde import run_to_proto

    run = Run.create_empty(run_id)
    run.status = RunStatus(status=status, sub_status=sub, details="")
    res = ListRunsResponse()
    res.run_dict[run_id].CopyFrom(run_to_proto(run))
    return res


def _fed(tmp_path, client) -> LocalFederation:
    fed = LocalFederation(nodes=1, workdir=tmp_path)
    fed._control = client
    return fed


def test_status_reads_status_and_sub_status_as_flwr_ls_prints_them(tmp_path, monkeypatch):
    monkeypatch.setattr(deploy, "POLL_S", 0.0)
    client = _Client([_listing(7, "running"), _listing(7, "finished", "completed")])
    assert deploy._wait_finished(_fed(tmp_path, client), 7, run_timeout=30) == "finished:completed"
    assert client.asked == 2
    assert deploy._status(_fed(tmp_path, _Client([ListRunsResponse()])), 7) == ("", "the SuperLink knows no run 7")


def test_a_control_api_that_stops_answering_ends_the_wait_with_a_typed_error(tmp_path, monkeypatch):
    monkeypatch.setattr(deploy, "POLL_S", 0.01)
    monkeypatch.setattr(deploy, "STATUS_GRACE_S", 0.2)
    client = _Client([_listing(7, "running"), ConnectionError("refused")])
    with pytest.raises(EngineError, match=r"did not report run 7 for 0 s: ConnectionError: refused"):
        deploy._wait_finished(_fed(tmp_path, client), 7, run_timeout=30)
    assert client.asked > 3  # it kept asking through the grace period


def test_a_key_that_is_no_nist_ec_key_is_refused_before_any_request(tmp_path):
    class _Refuse:
        def RegisterNode(self, request):  # noqa: N802
            raise AssertionError("no request may be made for a bad key")

    fed = _fed(tmp_path, _Refuse())
    bad = tmp_path / "ed.pub"
    bad.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH))
    with pytest.raises(EngineError, match="supernode-0.*not an EC key on a NIST curve"):
        fed.register_key(bad, "supernode-0")
    with pytest.raises(EngineError, match="cannot be registered"):
        fed.register_key(tmp_path / "missing.pub", "supernode-0")


def test_a_registered_key_records_the_node_id_the_superlink_gave(tmp_path):
    from flwr.proto.control_pb2 import RegisterNodeResponse  # pylint: disable=E0611

    sent = []

    class _Link:
        def RegisterNode(self, request):  # noqa: N802
            sent.append(request)
            return RegisterNodeResponse(node_id=4242)

    fed = _fed(tmp_path, _Link())
    pub = make_node_key(tmp_path / "keys" / "supernode-0")
    assert fed.register_key(pub, "supernode-0") == 4242
    assert fed.registered == {"supernode-0": 4242} and sent[0].name == "supernode-0"
    assert sent[0].public_key  # the key's bytes as Flower encodes them
