"""Resume (issue 9, part 4): a run stopped after its checkpoint and continued with ``resume=True``
ends with the uninterrupted run's final model, bit for bit, and the same JSONL lines, none lost or
duplicated -- for every registered strategy and for DP-SGD (per-client accountants in
``context.state``). Corrupted or mismatched checkpoints are refused with a typed error."""

import json
import zipfile

import numpy as np
import pytest

from fedsim.catalog import registries, resolve
from fedsim.config import load_scenario
from fedsim.engines.local import run_local
from fedsim.errors import CheckpointError, ConfigError
from fedsim.results import load_checkpoint, read_jsonl
from tests.conftest import tiny

REG = registries()
#: wall-clock fields: the only ones allowed to differ between two runs of the same scenario
TIMING = {"wall_s"}
DPSGD = ['privacy.mechanism="dp-sgd"', "privacy.noise_multiplier=1.1", "privacy.clip_norm=1.0", "client.max_steps=0"]


class Stop(KeyboardInterrupt):
    """What SIGINT raises, from a round callback: the run stops right after round ``at``."""


def stop_after(at: int):
    def on_round(rnd, row):
        if rnd == at:
            raise Stop("SIGINT")
    return on_round


def lines(run_dir, name):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / name)]


def final_model(run_dir):
    ckpts = sorted((run_dir / "checkpoints").glob("round_*.npz"))
    return load_checkpoint(ckpts[-1])["model"]


def interrupted_then_resumed(tmp_path, sets, at):
    """(uninterrupted run dir, resumed run dir); the second run stops after round ``at``."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_local(tiny(sets), full)["status"] == "completed"
    with pytest.raises(Stop):
        run_local(tiny(sets), part, on_round=stop_after(at))
    stopped = json.loads((part / "summary.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["rounds_completed"] == at
    again = resolve(load_scenario(part / "config.toml"))      # what `fedsim resume` runs
    summary = run_local(again, part, resume=True)
    assert summary["status"] == "completed" and summary["rounds_completed"] == again.run.rounds
    return full, part


def assert_same_run(full, part):
    for a, b in zip(final_model(full), final_model(part), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for name in ("metrics.jsonl", "clients.jsonl", "privacy.jsonl"):
        assert lines(part, name) == lines(full, name), name
    assert [r["round"] for r in read_jsonl(part / "metrics.jsonl")] == list(range(5))


@pytest.mark.slow
@pytest.mark.parametrize("name", REG["strategies"].names())
def test_every_strategy_resumes_to_the_uninterrupted_model(name, tmp_path):
    cls = REG["strategies"].get(name)
    # checkpoints every 2 rounds, stopped after round 3: round 3 is written, dropped and redone
    sets = [f'strategy.name="{name}"', "data.num_clients=6", "strategy.min_train_clients=6", "run.rounds=4",
            "run.checkpoint_every=2", *getattr(cls, "tiny_overrides", ())]
    full, part = interrupted_then_resumed(tmp_path, sets, at=3)
    assert_same_run(full, part)


@pytest.mark.slow
def test_dp_sgd_resumes_with_the_clients_accountants(tmp_path):
    full, part = interrupted_then_resumed(tmp_path, [*DPSGD, "run.rounds=4"], at=2)
    assert_same_run(full, part)
    ck = load_checkpoint(part / "checkpoints" / "round_0002.npz")
    described, _ = ck["clients"]
    assert any(rec["name"] == "plugin.dp_sgd" for recs in described.values() for rec in recs)
    eps = [r["epsilon"] for r in read_jsonl(part / "privacy.jsonl") if r["mechanism"] == "total"]
    assert eps == sorted(eps) and len(eps) == 4                       # ε keeps growing across the resume


def test_client_state_round_trips_exactly(tmp_path):
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fedsim.engines.local import pack_states, unpack_states

    state = RecordDict({"c": ConfigRecord({"i": 3, "f": 0.1, "inf": float("inf"), "b": b"\x00\xff", "s": "x",
                                           "l": [1.5, 2.5], "lb": [b"a", b""], "t": True}),
                        "a": ArrayRecord({"w": Array(np.arange(6, dtype=np.float64).reshape(2, 3)),
                                          "e": Array(np.zeros(0, dtype=np.int64))}),
                        "m": MetricRecord({"q": 2, "r": 0.25})})
    meta, blobs = pack_states({5: state})
    back = unpack_states(json.loads(json.dumps(meta)), blobs)[5]
    assert list(back.keys()) == ["c", "a", "m"]
    assert dict(back["c"]) == dict(state["c"]) and dict(back["m"]) == dict(state["m"])
    for k in ("w", "e"):
        assert back["a"][k].data == state["a"][k].data and back["a"][k].shape == state["a"][k].shape


# ---------------------------------------------------------------------------------------- refusals
@pytest.fixture
def stopped_run(tmp_path):
    """A 3-round run stopped after round 1 (its checkpoint is round 1)."""
    out = tmp_path / "run"
    with pytest.raises(Stop):
        run_local(tiny(["run.rounds=3"]), out, on_round=stop_after(1))
    return out


def resume(out):
    return run_local(resolve(load_scenario(out / "config.toml")), out, resume=True)


def test_changed_scenario_is_refused(stopped_run):
    cfg = stopped_run / "config.toml"
    cfg.write_text(cfg.read_text().replace("lr = 0.1", "lr = 0.2"))
    with pytest.raises(CheckpointError, match="different scenario") as err:
        resume(stopped_run)
    assert err.value.exit_code == 12


def test_truncated_checkpoint_is_refused(stopped_run):
    path = stopped_run / "checkpoints" / "round_0001.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        resume(stopped_run)


def test_checkpoint_missing_arrays_is_refused(stopped_run):
    path = stopped_run / "checkpoints" / "round_0001.npz"
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    dropped = next(n for n in entries if n.startswith("model/"))
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            if n != dropped:
                z.writestr(n, data)
    with pytest.raises(CheckpointError, match="missing"):
        resume(stopped_run)


@pytest.mark.parametrize("text", ["{not json", '{"round": 1}', '{"round": 1, "file": "../../x.npz"}'])
def test_bad_latest_json_is_refused(stopped_run, text):
    (stopped_run / "checkpoints" / "latest.json").write_text(text)
    with pytest.raises(CheckpointError):
        resume(stopped_run)


def test_nothing_to_resume_and_no_checkpoint_are_refused(tmp_path):
    run_local(tiny(["run.rounds=1"]), tmp_path / "done")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        resume(tmp_path / "done")
    with pytest.raises(Stop):
        run_local(tiny(["run.rounds=2", "run.checkpoint_every=0"]), tmp_path / "none", on_round=stop_after(1))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resume(tmp_path / "none")


def test_resume_needs_an_engine_that_restores_client_state(stopped_run):
    from flwr.app import Context, RecordDict

    from fedsim.server import build_server_app

    class NoRestore:  # a Grid without restore_state, like Flower's own (Ray, deployment)
        pass

    app = build_server_app(resolve(load_scenario(stopped_run / "config.toml")), stopped_run, resume=True)
    with pytest.raises(ConfigError, match="local engine"):
        app(NoRestore(), Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))


def test_torn_last_line_is_dropped_on_resume(stopped_run):
    with open(stopped_run / "clients.jsonl", "a") as fh:
        fh.write('{"round": 2, "client": 0, "sta')                  # killed mid-append in round 2
    assert resume(stopped_run)["status"] == "completed"
    rounds = [r["round"] for r in read_jsonl(stopped_run / "clients.jsonl")]
    assert rounds == sorted(rounds) and rounds.count(2) == 4 and rounds.count(3) == 4
