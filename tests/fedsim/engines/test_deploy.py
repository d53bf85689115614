"""The deployment engine end to end: a real SuperLink and SuperNodes over gRPC on 127.0.0.1.

Slow (each run starts ~4 processes and one ``flwr-clientapp`` process per message, ~10 s per
message exchange); run with ``pytest -m slow tests/fedsim/engines/test_deploy.py``.
"""

from __future__ import annotations

import json
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

from fedsim.engines.deploy import leftover_processes, run_deploy  # noqa: E402

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


def _check_completed(summary: dict, out: Path) -> None:
    assert summary["status"] == "completed"
    assert summary["engine"] == "deploy"
    assert summary["deploy"]["status"] == "finished:completed"
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    rounds = [r["round"] for r in read_jsonl(out / "metrics.jsonl") if r["round"] >= 1]
    assert rounds == [1]
    clients = read_jsonl(out / "clients.jsonl")
    assert sorted(c["client"] for c in clients) == [0, 1]
    assert all(c["status"] == "ok" for c in clients), clients
    link_log = (out / "deploy-logs" / "superlink.log").read_text()
    assert "Starting Fleet API (gRPC-rere) on 127.0.0.1:" in link_log
    assert link_log.count("[Fleet.ActivateNode] Activated node_id=") == 2
    assert "[Fleet.PushMessages]" in link_log  # the replies came over the gRPC Fleet API
    assert "/v1/fleet/" not in link_log  # ...and not over an HTTP Fleet API
    assert (out / "deploy-logs" / "serverapp.log").exists()


def test_deploy_two_supernodes_over_grpc(tmp_path):
    out = tmp_path / "run"
    summary = run_deploy(_scenario(), out, nodes=2)
    _check_completed(summary, out)
    assert summary["deploy"]["tls"] is False
    _assert_clean(summary["deploy"]["scratch_dir"])


def test_deploy_with_tls(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    out = tmp_path / "run"
    summary = run_deploy(_scenario(deploy={"insecure": False}), out, nodes=2)
    _check_completed(summary, out)
    assert summary["deploy"]["tls"] is True
    assert "--insecure" not in (out / "deploy-logs" / "superlink.log").read_text()
    _assert_clean(summary["deploy"]["scratch_dir"])


def test_failed_serverapp_raises_engine_error(tmp_path, monkeypatch):
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
    with pytest.raises(EngineError) as err:
        run_deploy(scen, out, nodes=2)
    msg = str(err.value)
    assert "finished:failed" in msg
    assert "QuorumError" in msg or "only 2 of the 3 clients" in msg
    assert json.loads((out / "summary.json").read_text())["status"].startswith("stopped")
    assert (out / "deploy-logs" / "superlink.log").exists()
    assert len(scratch) == 1
    _assert_clean(scratch[0])


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
