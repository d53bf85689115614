"""The embedded engine: the real ServerApp/ClientApp, determinism, failures recorded, run directory."""

import json

import numpy as np
import pytest

from fedsim.engines.local import run_local
from fedsim.results import read_jsonl
from tests.conftest import tiny


def _final(run_dir):
    return read_jsonl(run_dir / "metrics.jsonl")[-1]


def test_run_directory_layout(tmp_path):
    summary = run_local(tiny(), tmp_path)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    for name in ("config.toml", "metrics.jsonl", "metrics.csv", "clients.jsonl", "summary.json",
                 "plots/accuracy.png", "plots/loss.png", "plots/participation.png", "checkpoints/latest.json"):
        assert (tmp_path / name).exists(), name
    cfg = (tmp_path / "config.toml").read_text()
    assert "seed = 3" in cfg and "flwr" in cfg and "torch" in cfg
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    clients = read_jsonl(tmp_path / "clients.jsonl")
    assert {c["client"] for c in clients} == {0, 1, 2, 3} and all(c["status"] == "ok" for c in clients)
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["test_accuracy"] > 0.1


def test_same_seed_same_metrics(tmp_path):
    a = run_local(tiny(), tmp_path / "a")["final"]
    b = run_local(tiny(), tmp_path / "b")["final"]
    assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-9)
    c = run_local(tiny(["run.seed=4"]), tmp_path / "c")["final"]
    assert c["test_loss"] != pytest.approx(a["test_loss"], abs=1e-9)


def test_client_that_raises_does_not_stop_the_run(tmp_path):
    s = tiny(["faults.crash_clients=[1]", "faults.crash_rounds=[2]"])
    summary = run_local(s, tmp_path)
    assert summary["status"] == "completed"
    clients = read_jsonl(tmp_path / "clients.jsonl")
    bad = [c for c in clients if c["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["client"] == 1 and bad[0]["round"] == 2
    assert bad[0]["status"] == "error" and "InjectedCrash" in bad[0]["reason"]
    assert _final(tmp_path)["num-clients"] == 3


def test_killed_client_is_recorded(tmp_path):
    s = tiny(["run.round_timeout=2"])
    summary = run_local(s, tmp_path, grid_hook=lambda grid: _kill_after_discovery(grid, 2))
    assert summary["status"] == "completed"
    bad = [c for c in read_jsonl(tmp_path / "clients.jsonl") if c["status"] != "ok"]
    assert bad and all(c["client"] == 2 and c["status"] == "timeout" for c in bad)


def _kill_after_discovery(grid, pid):
    # the node answers whoami, then dies before training (like a SuperNode killed mid-run)
    original = grid._handle

    def handle(msg, context):
        if context.node_config["partition-id"] == pid and msg.metadata.message_type.startswith("train"):
            grid.dead.add(context.node_id)
            raise SystemExit("killed")
        return original(msg, context)

    grid._handle = handle


def test_invalid_update_is_rejected_and_named(tmp_path):
    s = tiny(["faults.byzantine_clients=[0]", 'faults.attack="nan"'])
    run_local(s, tmp_path)
    bad = [c for c in read_jsonl(tmp_path / "clients.jsonl") if c["status"] == "invalid"]
    assert bad and bad[0]["client"] == 0 and "NaN" in bad[0]["reason"]
    assert np.isfinite(_final(tmp_path)["test_loss"])


def test_dropout_is_seeded(tmp_path):
    s = tiny(["faults.dropout=0.5", "run.quorum=0.0"])
    run_local(s, tmp_path / "a")
    run_local(s, tmp_path / "b")
    fa = [(c["round"], c["client"], c["status"]) for c in read_jsonl(tmp_path / "a/clients.jsonl")]
    fb = [(c["round"], c["client"], c["status"]) for c in read_jsonl(tmp_path / "b/clients.jsonl")]
    assert fa == fb and any(st == "error" for _, _, st in fa)


def test_checkpoint_holds_final_model(tmp_path):
    from fedsim.results import load_checkpoint

    run_local(tiny(), tmp_path)
    ck = load_checkpoint(tmp_path / "checkpoints" / "round_0002.npz")
    assert ck["meta"]["round"] == 2 and all(np.isfinite(a).all() for a in ck["model"])


def test_crash_mode_exit_is_a_dead_node(tmp_path):
    s = tiny(["faults.crash_clients=[3]", 'faults.crash_mode="exit"', "faults.crash_rounds=[1]",
              "run.round_timeout=1"])
    summary = run_local(s, tmp_path)
    assert summary["status"] == "completed"
    bad = [c for c in read_jsonl(tmp_path / "clients.jsonl") if c["status"] != "ok"]
    assert bad and all(c["client"] == 3 for c in bad) and bad[0]["status"] == "timeout"
    assert all(c["client"] != 3 for c in read_jsonl(tmp_path / "clients.jsonl") if c["round"] == 2)


# ----------------------------------------------------------------- issue 9: honest endings, deadlines
class FakeClock:
    """``time`` for fedsim.engines.local: perf_counter advances only when a client 'works'."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def time(self):
        return 1.7e9 + self.now


def _slow_client(grid, clock, pid, seconds):
    original = grid._handle

    def handle(msg, context):
        if context.node_config["partition-id"] == pid and msg.metadata.message_type.startswith("train"):
            clock.now += seconds           # this client's call takes `seconds` of (simulated) wall time
        return original(msg, context)

    grid._handle = handle


def test_round_timeout_drops_a_late_reply_on_the_local_engine(tmp_path, monkeypatch):
    import fedsim.engines.local as local

    clock = FakeClock()
    monkeypatch.setattr(local, "time", clock)
    grids = []
    s = tiny(["run.round_timeout=5"])
    summary = run_local(s, tmp_path, grid_hook=lambda g: (grids.append(g), _slow_client(g, clock, 1, 6.0)))
    assert summary["status"] == "completed"
    clients = read_jsonl(tmp_path / "clients.jsonl")
    late = [(c["round"], c["client"]) for c in clients if c["status"] == "timeout"]
    assert late == [(1, 1), (2, 1)]
    assert all(c["status"] == "ok" for c in clients if c["client"] != 1)
    assert _final(tmp_path)["num-clients"] == 3
    assert [round(t, 6) for _, t in grids[0].late] == [6.0, 6.0]
    # just within the deadline: the reply counts
    run_local(tiny(["run.round_timeout=6.5"]), tmp_path / "b", grid_hook=lambda g: _slow_client(g, clock, 1, 6.0))
    assert all(c["status"] == "ok" for c in read_jsonl(tmp_path / "b" / "clients.jsonl"))


def test_every_client_crashing_stops_the_run_with_a_typed_error(tmp_path):
    from fedsim.errors import FailedRoundError

    s = tiny(["faults.crash_clients=[0, 1, 2, 3]"])
    with pytest.raises(FailedRoundError, match="no valid reply") as err:
        run_local(s, tmp_path)
    assert err.value.exit_code == 10 and "on_failed_round" in err.value.hint
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "stopped: FailedRoundError" and summary["failed_rounds"] == [1]
    assert summary["rounds_completed"] == 1 and summary["error_type"] == "FailedRoundError"
    assert _final(tmp_path)["round-failed"] == 1


def test_quorum_never_met_stops_the_run(tmp_path):
    from fedsim.errors import FailedRoundError, QuorumError

    with pytest.raises(QuorumError, match="quorum") as err:        # FailedRoundError is a QuorumError
        run_local(tiny(["faults.crash_clients=[0, 1, 2]", "run.quorum=0.5"]), tmp_path)
    assert isinstance(err.value, FailedRoundError)


def test_on_failed_round_continue_goes_on_and_counts_them(tmp_path):
    from fedsim.results import load_checkpoint

    s = tiny(["faults.crash_clients=[0, 1, 2, 3]", "faults.crash_rounds=[2]", "run.rounds=3",
              'run.on_failed_round="continue"'])
    summary = run_local(s, tmp_path)
    assert summary["status"] == "completed" and summary["failed_rounds"] == [2]
    before = load_checkpoint(tmp_path / "checkpoints" / "round_0001.npz")["model"]
    after = load_checkpoint(tmp_path / "checkpoints" / "round_0002.npz")["model"]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))       # the failed round changed nothing


@pytest.mark.parametrize("raised, status, kind", [
    (KeyboardInterrupt("SIGTERM"), "interrupted", KeyboardInterrupt),
    (RuntimeError("disk full"), "failed: RuntimeError", RuntimeError),
])
def test_a_run_that_does_not_finish_never_says_completed(tmp_path, raised, status, kind):
    def on_round(rnd, row):
        if rnd == 1:
            raise raised

    with pytest.raises(kind):
        run_local(tiny(["run.rounds=5"]), tmp_path, on_round=on_round)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == status and summary["rounds_completed"] == 1 and summary["rounds_planned"] == 5
    assert summary["error"] in ("SIGTERM", "disk full")


def test_summary_records_whether_the_batched_path_trained(tmp_path):
    """The default batches fedsim's own plain clients; a foreign ClientApp and ``false`` never are."""
    from tests.fedsim.engines.vanilla_app import build_vanilla_app

    grids = []
    default = run_local(tiny(), tmp_path / "default", grid_hook=grids.append)
    assert default["vectorized"]["used"] and default["vectorized"]["clients_batched"] == 8
    assert json.loads((tmp_path / "default" / "summary.json").read_text())["vectorized"] == default["vectorized"]
    off = run_local(tiny(["run.vectorize=false"]), tmp_path / "off", grid_hook=grids.append)
    assert grids[1].batcher is None and off["vectorized"] == {"used": False, "reason": "run.vectorize = false"}
    seen = []
    foreign = run_local(tiny(), tmp_path / "foreign", client_app=build_vanilla_app(seen), grid_hook=grids.append)
    assert grids[2].batcher is None and len(seen) == 8  # every client through the given app
    assert foreign["vectorized"]["used"] is False and "not fedsim's" in foreign["vectorized"]["reason"]
