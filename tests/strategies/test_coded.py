"""coded_gd (strategies/coded.py) through the local engine: exact GD under stragglers, never a
silently wrong gradient, sequential GC, the simulated clock, the train messages and reply validation.
The work layout alone is tested in test_coded_work.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsim.data.federation import federation_of
from fedsim.engines.local import run_local
from fedsim.errors import ClientUpdateError, ConfigError, FailedRoundError
from fedsim.models import build_model
from fedsim.results import load_checkpoint, read_jsonl
from fedsim.rng import derive_seed
from fedsim.strategies.base import FedSimStrategy, make_strategy
from fedsim.strategies.coded import CodedGD
from fedsim.wire import from_numpy, state_to_arrays, to_numpy
from tests.conftest import tiny

N = 6
LR = 0.5


def scenario(*sets: str):
    return tiny(['strategy.name="coded_gd"', f"data.num_clients={N}", f"strategy.min_train_clients={N}",
                 "run.rounds=4", f"strategy.lr={LR}", 'strategy.precision="float64"', *sets])


def run(tmp_path, s, tag: str = "run"):
    out = tmp_path / tag
    summary = run_local(s, out)
    assert summary["status"] == "completed", summary
    ckpt = load_checkpoint(sorted((out / "checkpoints").glob("round_*.npz"))[-1])
    return read_jsonl(out / "metrics.jsonl")[1:], read_jsonl(out / "clients.jsonl"), ckpt


def replicas(ckpt) -> list[np.ndarray]:
    reps: dict[int, dict[int, np.ndarray]] = {}
    for key, a in ckpt["strategy"].items():
        parts = key.split(".")
        if parts[0] == "replica":
            reps.setdefault(int(parts[1]), {})[int(parts[2])] = np.ravel(a)
    return [np.concatenate([d[i] for i in sorted(d)]) for _, d in sorted(reps.items())]


def reference_gd(s, steps: int, delay: int = 0) -> np.ndarray:
    """Full-batch GD on the mean cross-entropy of ALL clients' data, in float64, written directly in
    torch (no fedsim strategy code). ``delay = T``: x_{r+1} = x_r - lr * grad(x_{r-T}) for r >= T."""
    fed = federation_of(s)
    ds = fed.dataset
    idx = np.concatenate(fed.client_indices)
    x = torch.tensor(ds.x_train[idx], dtype=torch.float64)
    y = torch.tensor(ds.y_train[idx], dtype=torch.long)
    model = build_model(s.model, tuple(ds.input_shape), ds.num_classes,
                        derive_seed(s.run.seed, "model-init")).double()
    params = list(model.parameters())
    history = []
    for r in range(steps + delay):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        history.append(torch.autograd.grad(loss, params))
        if r >= delay:
            with torch.no_grad():
                for p, g in zip(params, history[r - delay]):
                    p -= LR * g
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy()


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("scheme, s", [("cyclic", 2), ("fr", 2)])
def test_coded_gd_equals_full_gd_with_at_most_s_stragglers(tmp_path, scheme, s):
    # bursty (B, W, lam = s): never more than s stragglers in a round; on_excess = "skip" proves the
    # master never waited for one: every step was decoded from n - s non-stragglers.
    sc = scenario(f'strategy.scheme="{scheme}"', f"strategy.s={s}", 'strategy.stragglers="bursty"',
                  "strategy.B=1", "strategy.W=2", f"strategy.lam={s}", "strategy.p_start=0.6",
                  'strategy.on_excess="skip"')
    rows, clients, ckpt = run(tmp_path, sc)
    assert all(r["decoded"] == 1 and "aggregation-failed" not in r for r in rows)
    stragglers = [c for c in clients if c["status"] == "straggler"]
    assert stragglers and all(r["stragglers"] <= s for r in rows)
    assert sum(r["stragglers"] for r in rows) == len(stragglers)
    assert all(r["waited-stragglers"] == 0 and r["num-clients"] == N - s for r in rows)
    ref = reference_gd(sc, steps=4)
    (final,) = replicas(ckpt)
    assert np.max(np.abs(final - ref)) < 1e-6
    float32_model = np.concatenate([np.ravel(a) for a in ckpt["model"]]).astype(np.float64)
    assert np.max(np.abs(float32_model - ref)) < 1e-6


def test_more_than_s_stragglers_wait_or_skip_never_a_wrong_step(tmp_path):
    sets = ["strategy.s=1", 'strategy.stragglers="bernoulli"', "strategy.p=0.4"]
    rows, clients, ckpt = run(tmp_path, scenario(*sets, 'strategy.on_excess="skip"'), "skip")
    decoded = sum(r["decoded"] for r in rows)
    skipped = [r for r in rows if r.get("aggregation-failed")]
    assert skipped and 0 < decoded < len(rows)                     # the seed gives both kinds of round
    assert all(r["stragglers"] > 1 for r in skipped)
    assert len([c for c in clients if c["status"] == "aggregation"]) == len(skipped)
    (final,) = replicas(ckpt)
    assert np.max(np.abs(final - reference_gd(scenario(), steps=decoded))) < 1e-6   # skipped = no step

    rows, clients, ckpt = run(tmp_path, scenario(*sets, 'strategy.on_excess="wait"'), "wait")
    assert all(r["decoded"] == 1 for r in rows)
    assert any(r["waited-stragglers"] > 0 for r in rows)
    waited = [r for r in rows if r["waited-stragglers"]]
    assert all(r["sim-round-time"] > 1.0 for r in waited)       # waiting costs the straggler delay
    (final,) = replicas(ckpt)
    assert np.max(np.abs(final - reference_gd(scenario(), steps=4))) < 1e-6


def test_missing_workers_cyclic_refuses_fr_still_decodes(tmp_path):
    base = ["strategy.s=1", 'strategy.stragglers="none"', "run.rounds=2"]
    # cyclic, 2 crashed workers > s = 1: the decoder's residual check refuses, the model stays put — and a run
    # that decoded in no round trained nothing, so it ends "failed: every round failed", never "completed"
    with pytest.raises(FailedRoundError, match="every one of the 2 rounds"):
        run_local(scenario(*base, "faults.crash_clients=[0, 1]"), tmp_path / "cyclic")
    out = tmp_path / "cyclic"
    assert json.loads((out / "summary.json").read_text())["status"] == "failed: every round failed"
    rows, clients = read_jsonl(out / "metrics.jsonl")[1:], read_jsonl(out / "clients.jsonl")
    assert all(r["aggregation-failed"] == 1 and r["decoded"] == 0 for r in rows)
    assert any("cannot decode" in c.get("reason", "") for c in clients if c["status"] == "aggregation")
    (final,) = replicas(load_checkpoint(sorted((out / "checkpoints").glob("round_*.npz"))[-1]))
    assert np.array_equal(final, reference_gd(scenario(), steps=0))
    # fractional repetition, groups {0,1} {2,3} {4,5}: workers 0 and 2 lost, every group has a survivor
    rows, _, ckpt = run(tmp_path, scenario(*base, 'strategy.scheme="fr"', "faults.crash_clients=[0, 2]"), "fr")
    assert all(r["decoded"] == 1 for r in rows)
    (final,) = replicas(ckpt)
    assert np.max(np.abs(final - reference_gd(scenario(), steps=2))) < 1e-6


# ------------------------------------------------------------------------------------ sequential
@pytest.mark.parametrize("scheme, T", [("sr-sgc", 1), ("m-sgc", 2)])
def test_sequential_gc_interleaved_replicas_follow_exact_gd(tmp_path, scheme, T):
    sc = scenario(f'strategy.sequential="{scheme}"', "strategy.B=1", "strategy.W=3", "strategy.lam=2",
                  'strategy.stragglers="bursty"', "strategy.p_start=0.5", "strategy.mu=0.5", "run.rounds=6")
    rows, clients, ckpt = run(tmp_path, sc)
    assert sum(r["jobs-decoded"] for r in rows) == 6 - T                 # every job, by its deadline
    assert any(c["status"] == "straggler" for c in clients)
    assert all(r["decode-delay"] <= T for r in rows)
    steps = [int(v) for v in np.ravel(ckpt["strategy"]["steps"])]
    assert len(steps) == T + 1 and sum(steps) == 6 - T
    for replica, k in zip(replicas(ckpt), steps):
        assert np.max(np.abs(replica - reference_gd(sc, steps=k))) < 1e-6


def test_msgc_delayed_is_gd_with_gradients_delayed_by_T(tmp_path):
    sc = scenario('strategy.sequential="m-sgc"', 'strategy.jobs="delayed"', "strategy.B=1", "strategy.W=3",
                  "strategy.lam=1", 'strategy.stragglers="bursty"', "strategy.p_start=0.5", "strategy.mu=0.5",
                  "run.rounds=5")
    rows, _, ckpt = run(tmp_path, sc)
    assert [r["decode-delay"] for r in rows if r["jobs-decoded"]] == [2, 2, 2]
    (final,) = replicas(ckpt)
    assert np.max(np.abs(final - reference_gd(sc, steps=3, delay=2))) < 1e-6


# ------------------------------------------------------------------------------------ clock
def test_simulated_round_time_uncoded_waits_for_all_gc_for_n_minus_s(tmp_path):
    for s_, tag in ((0, "uncoded"), (2, "gc")):
        sc = scenario(f"strategy.s={s_}", "strategy.p=0.3", 'strategy.precision="float32"')
        st = make_strategy(sc)
        rows, clients, _ = run(tmp_path, sc, tag)
        sizes = np.diff([a for a, _ in st.work_layout.shard_pieces] + [st.N])
        load = np.array([sizes[st.code.partitions_of(i)].sum() / st.N for i in range(N)])
        for r, row in enumerate(rows):
            t = st.time_model.times(load, st.pattern[r][None, :], st.noise[r][None, :])[0]
            assert row["sim-round-time"] == pytest.approx(np.sort(t)[N - s_ - 1], rel=1e-12)
            assert row["worker-load-mean"] == pytest.approx(load.mean())
        assert rows[-1]["sim-total-time"] == pytest.approx(sum(r["sim-round-time"] for r in rows))
        assert rows[0]["nominal-load"] == pytest.approx((s_ + 1) / N)
        if s_ == 0:
            assert not [c for c in clients if c["status"] != "ok"]      # uncoded waits for everyone


# ------------------------------------------------------------------------------------ train messages
class FakeGrid:
    """Just enough of a Grid for ``configure_train``: node ``100 + i`` is partition ``i``."""

    def __init__(self, n: int) -> None:
        self.node_partitions = {100 + i: i for i in range(n)}

    def get_node_ids(self) -> list[int]:
        return list(self.node_partitions)


@pytest.fixture
def server_identity():
    """Messages can only be built inside a task; the local engine sets the same identity."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved


def test_coded_gd_fills_the_template_hooks_only():
    for method in ("configure_train", "aggregate_train"):
        assert getattr(CodedGD, method) is getattr(FedSimStrategy, method)


def test_train_messages_carry_tasks_model_versions_and_skip_idle_workers(server_identity):
    # SR-SGC, n = 6, (B, W, lam) = (1, 3, 2): s = 1, T = 1, 3 jobs in 4 rounds. Workers 0 and 1
    # straggle in round 2 (job 2): in round 3 one of them redoes job 2 at its own model version,
    # and the other five get no message at all.
    sc = scenario('strategy.sequential="sr-sgc"', "strategy.B=1", "strategy.W=3", "strategy.lam=2")
    st = make_strategy(sc)
    fed = federation_of(sc)
    model = build_model(sc.model, tuple(fed.input_shape), fed.num_classes, derive_seed(sc.run.seed, "model-init"))
    arrays, grid = state_to_arrays(model), FakeGrid(N)
    rows = [np.zeros(N, bool), np.zeros(N, bool), np.array([1, 1, 0, 0, 0, 0], bool)]
    for rnd, row in enumerate(rows, start=1):
        msgs = list(st.configure_train(rnd, arrays, ConfigRecord({}), grid))
        assert st.sampled == list(range(N)) and len(msgs) == N
        for m in msgs:
            pid = grid.node_partitions[m.metadata.dst_node_id]
            cfg = m.content.config_records["config"]
            assert m.metadata.message_type == "train.coded_gradient"
            assert json.loads(cfg["tasks"]) == st.work_layout.task_list(st.work[pid]) and cfg["job"] == rnd - 1
            assert sorted(m.content.array_records) == ["arrays"]
            assert to_numpy(m.content.array_records["arrays"][st.keys[0]]).dtype == np.float64   # float64 master
        st.sched.step(row)
        st.versions[rnd - 1][0] = st.versions[rnd - 1][0] + rnd      # mark each job's model version
    msgs = list(st.configure_train(4, arrays, ConfigRecord({}), grid))
    assert st.sampled == [0] and [m.metadata.dst_node_id for m in msgs] == [100]
    (msg,) = msgs
    assert json.loads(msg.content.config_records["config"]["tasks"])[0][0] == 2
    assert sorted(msg.content.array_records) == ["arrays", "model.2"]
    np.testing.assert_array_equal(to_numpy(msg.content.array_records["model.2"][st.keys[0]]), st.versions[2][0])
    evaluation = st.sample(4, grid, 1.0)                # evaluation rounds are not narrowed to the work
    assert [p for p, _ in evaluation] == list(range(N))


# ------------------------------------------------------------------------------------ validation
def test_coded_reply_validation():
    st = make_strategy(scenario())
    st.work = {3: [object()]}            # one task this round
    d = st.layout.dim
    good = np.zeros(d)
    assert st.parse_reply(RecordDict({"coded": ArrayRecord({"0": from_numpy(good)})}), {}, 3)[0].shape == (d,)
    nan = good.copy()
    nan[0] = np.nan
    cases = {
        "missing": RecordDict({}),
        "keys": RecordDict({"coded": ArrayRecord({"1": from_numpy(good)})}),
        "count": RecordDict({"coded": ArrayRecord({"0": from_numpy(good), "1": from_numpy(good)})}),
        "dtype": RecordDict({"coded": ArrayRecord({"0": from_numpy(good.astype(np.float32))})}),
        "shape": RecordDict({"coded": ArrayRecord({"0": from_numpy(good[:-1])})}),
        "nan": RecordDict({"coded": ArrayRecord({"0": from_numpy(nan)})}),
    }
    for case, content in cases.items():
        with pytest.raises(ClientUpdateError):
            st.parse_reply(content, {}, 3)
    with pytest.raises(ClientUpdateError):
        st.parse_reply(RecordDict({"coded": ArrayRecord({"0": from_numpy(good)})}), {}, 4)  # not a worker


@pytest.mark.parametrize("scheme, s, dtype", [("cyclic", 1, np.float64), ("fr", 1, np.float64),
                                               ("cyclic", 0, np.float32)])
def test_messages_travel_in_float64_unless_uncoded(scheme, s, dtype):
    # default precision (float32): coded messages are combinations of float32 gradients, and one
    # float32 rounding of them is magnified by decoding and by GD (issue 12): float64 on the wire.
    # Uncoded (s = 0) messages are single float32 gradients: float32 carries them losslessly.
    st = make_strategy(scenario(f'strategy.scheme="{scheme}"', f"strategy.s={s}", 'strategy.precision="float32"'))
    assert st.message_dtype == dtype
    st.work = st.work_layout.round_work(0)
    assert st.train_config(1, 3)["transport"] == np.dtype(dtype).name
    good, other = np.zeros(st.layout.dim, dtype=dtype), np.zeros(st.layout.dim, dtype=np.float32 if
                                                                  dtype == np.float64 else np.float64)
    assert st.parse_reply(RecordDict({"coded": ArrayRecord({"0": from_numpy(good)})}), {}, 3)[0].dtype == np.float64
    with pytest.raises(ClientUpdateError):
        st.parse_reply(RecordDict({"coded": ArrayRecord({"0": from_numpy(other)})}), {}, 3)


@pytest.mark.parametrize("sets, key", [
    (["strategy.fraction_train=0.5"], "strategy.fraction_train"),
    (["faults.stragglers=0.2"], "faults.stragglers"),
    (['strategy.scheme="fr"', "strategy.s=3"], "strategy.scheme"),          # 4 does not divide 6
    (["strategy.s=6"], "strategy.s"),
    (['strategy.sequential="m-sgc"', "strategy.W=4", "run.rounds=3"], "run.rounds"),
    (['strategy.sequential="sr-sgc"', "strategy.B=2", "strategy.W=4"], "strategy.B"),
    (['strategy.sequential="sr-sgc"', 'strategy.on_excess="skip"'], "strategy.on_excess"),
    (['model.name="mlp"', "model.dropout=0.2"], "model.dropout"),
])
def test_bad_settings_are_config_errors(sets, key):
    with pytest.raises(ConfigError) as err:
        make_strategy(scenario(*sets))
    assert err.value.key == key


def test_unknown_option_values_are_rejected():
    for bad in ('strategy.scheme="mds"', 'strategy.stragglers="weibull"', "strategy.p=1.5",
                'strategy.jobs="parallel"', "strategy.W=1"):
        with pytest.raises(ConfigError):
            scenario(bad)


def test_state_dict_round_trip(tmp_path):
    sc = scenario('strategy.sequential="m-sgc"', "strategy.B=1", "strategy.W=3", "strategy.lam=1", "run.rounds=4")
    _, _, ckpt = run(tmp_path, sc)
    st = make_strategy(sc)
    st.load_state_dict(ckpt["strategy"])
    again = st.state_dict()
    assert sorted(again) == sorted(ckpt["strategy"])
    for k, v in again.items():
        np.testing.assert_array_equal(np.asarray(v), ckpt["strategy"][k])


@pytest.mark.slow
def test_ray_engine_gives_the_local_metrics(tmp_path):
    pytest.importorskip("ray")
    from fedsim.engines.ray import run_ray

    s = scenario('strategy.sequential="sr-sgc"', 'strategy.stragglers="bursty"', "strategy.p_start=0.5")
    local, _, _ = run(tmp_path, s, "local")
    assert run_ray(s, tmp_path / "ray")["status"] == "completed"
    ray = read_jsonl(tmp_path / "ray" / "metrics.jsonl")[1:]
    assert len(ray) == len(local)
    for a, b in zip(local, ray):
        # wall time and bytes on the wire are the engine's own: message metadata carries node ids, whose
        # protobuf varint length differs between the local engine's ids and Ray's
        own = ("wall_s", "downlink_bytes", "uplink_bytes")
        assert {k: v for k, v in a.items() if k not in own} == pytest.approx(
            {k: v for k, v in b.items() if k not in own}, abs=1e-6)
