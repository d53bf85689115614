"""ScaleCom: CLT-k indices, low-pass error feedback, sparse aggregation, and the two-exchange round."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.clients.plugins.scalecom import ScaleCom
from fedsim.engines.local import run_local
from fedsim.errors import ConfigError
from fedsim.results import load_checkpoint, read_jsonl
from fedsim.strategies.base import make_strategy
from fedsim.strategies.scalecom_math import (aggregate_sparse, clt_k_indices, ef_update, layer_k, leader_of,
                                             segments_of)
from fedsim.wire import to_numpy
from tests.conftest import tiny


def test_clt_k_takes_the_largest_magnitudes_of_each_tensor():
    acc = np.array([0.1, -5.0, 2.0, 0.0, 3.0, -0.2, 0.3, 9.0, -1.0])
    idx = clt_k_indices(acc, segments_of([4, 5]), density=0.5)  # k = 2 of 4, 3 of 5
    assert idx.tolist() == [1, 2, 4, 7, 8]
    assert layer_k(5, 0.5) == 3 and layer_k(5, 1.0) == 5 and layer_k(3, 1e-9) == 1
    assert clt_k_indices(acc, segments_of([9]), 1.0).tolist() == list(range(9))


def test_leader_rotates_cyclically_over_the_sampled_clients():
    assert [leader_of(t, [0, 1, 2, 3], 4) for t in range(1, 7)] == [0, 1, 2, 3, 0, 1]
    assert leader_of(2, [0, 2, 3], 4) == 2 and leader_of(4, [0, 2], 4) == 0


def test_error_feedback_with_beta_one_is_standard_ef_and_keeps_what_was_not_sent():
    rng = np.random.default_rng(0)
    m = np.zeros(10)
    sent_total, delta_total = np.zeros(10), np.zeros(10)
    for _ in range(5):
        delta = rng.normal(size=10)
        a = m + delta
        idx = clt_k_indices(a, segments_of([10]), 0.3)
        sent = np.zeros(10)
        sent[idx] = a[idx]
        new = ef_update(m, a, idx, beta=1.0)
        np.testing.assert_array_equal(new, a - sent)  # m' = a - C(a)
        m = new
        sent_total += sent
        delta_total += delta
    np.testing.assert_allclose(sent_total + m, delta_total, atol=1e-12)  # nothing lost: sent + memory
    a, idx = np.arange(1.0, 6.0), np.array([4])
    np.testing.assert_allclose(ef_update(np.ones(5), a, idx, 0.25), 0.75 * np.ones(5) + 0.25 * np.array(
        [1.0, 2.0, 3.0, 4.0, 0.0]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.data())
def test_sparse_aggregation_is_the_weighted_mean_of_the_scattered_updates(m, size, data):
    idx = np.array(sorted(data.draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=size))))
    vals = [np.array(data.draw(st.lists(st.floats(-1e3, 1e3), min_size=len(idx), max_size=len(idx))))
            for _ in range(m)]
    w = data.draw(st.lists(st.floats(0.5, 50), min_size=m, max_size=m))
    out = aggregate_sparse(vals, w, idx, size)
    dense = np.zeros((m, size))
    for i, v in enumerate(vals):
        dense[i, idx] = v
    np.testing.assert_allclose(out, np.average(dense, axis=0, weights=w), rtol=1e-9, atol=1e-9)
    assert np.all(out[np.setdiff1d(np.arange(size), idx)] == 0)
    perm = data.draw(st.permutations(range(m)))
    np.testing.assert_allclose(aggregate_sparse([vals[i] for i in perm], [w[i] for i in perm], idx, size), out,
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(aggregate_sparse(vals, [3 * x for x in w], idx, size), out, rtol=1e-9, atol=1e-9)


def test_the_plugin_sends_a_at_the_indices_and_keeps_the_residual():
    p = ScaleCom()
    p.pending = np.array([1.0, -4.0, 2.0, 0.5], np.float32)
    vals = p.send(np.array([1, 2]), beta=1.0)
    assert vals.tolist() == [-4.0, 2.0] and p.memory.tolist() == [1.0, 0.0, 0.0, 0.5] and p.pending is None
    restored = ScaleCom()
    restored.load_state_dict(p.state_dict())
    np.testing.assert_array_equal(restored.memory, p.memory)
    with pytest.raises(RuntimeError, match="no local update is pending"):
        p.send(np.array([0]), beta=1.0)


def test_the_plugin_is_refused_without_the_scalecom_strategy():
    with pytest.raises(ConfigError, match="scalecom"):
        tiny(['client.plugins=["scalecom"]'])


def _spy_run(overrides, tmp_path):
    seen = []

    def hook(grid):
        inner = grid.send_and_receive

        def spy(messages, *, timeout=None):
            msgs = list(messages)
            replies = list(inner(msgs, timeout=timeout))
            seen.append((msgs, replies))
            return replies

        grid.send_and_receive = spy

    s = tiny(['strategy.name="scalecom"', "strategy.min_train_clients=4", "run.rounds=3", *overrides])
    assert run_local(s, tmp_path, grid_hook=hook)["status"] == "completed"
    return seen


def test_every_client_sends_values_on_the_leaders_indices_and_the_leader_rotates(tmp_path):
    seen = _spy_run(["strategy.density=0.2"], tmp_path)
    phases = [m[0].content.config_records["config"]["scalecom-phase"] for m, _ in seen]
    assert phases == ["train", "send"] * 3
    for rnd in range(3):
        (train_msgs, train_replies), (send_msgs, send_replies) = seen[2 * rnd], seen[2 * rnd + 1]
        leaders = [m.metadata.dst_node_id for m in train_msgs if m.content.config_records["config"]["scalecom-leader"]]
        assert len(leaders) == 1
        led = [r for r in train_replies if "scalecom" in r.content.array_records]
        assert [r.metadata.src_node_id for r in led] == leaders
        idx = to_numpy(led[0].content.array_records["scalecom"]["indices"])
        assert len(idx) == sum(layer_k(n, 0.2) for n in (64 * 16, 16, 16 * 10, 10))
        for m in send_msgs:
            np.testing.assert_array_equal(to_numpy(m.content.array_records["scalecom"]["indices"]), idx)
            assert len(m.content.array_records["arrays"]) == 0  # no model in the second exchange
        assert {len(to_numpy(r.content.array_records["scalecom"]["values"])) for r in send_replies} == {len(idx)}
    rows = read_jsonl(tmp_path / "metrics.jsonl")[1:]
    assert [r["scalecom/leader"] for r in rows] == [0, 1, 2]


@pytest.mark.slow
def test_density_one_equals_fedavg(tmp_path):
    base = ["strategy.min_train_clients=4", "run.rounds=2", "run.checkpoint_every=1"]
    assert run_local(tiny(base), tmp_path / "f")["status"] == "completed"
    assert run_local(tiny(['strategy.name="scalecom"', "strategy.density=1.0", "strategy.beta=0.3", *base]),
                     tmp_path / "s")["status"] == "completed"
    fed = load_checkpoint(tmp_path / "f" / "checkpoints" / "round_0002.npz")["model"]
    sc = load_checkpoint(tmp_path / "s" / "checkpoints" / "round_0002.npz")["model"]
    for a, b in zip(fed, sc):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    up_f = read_jsonl(tmp_path / "f" / "metrics.jsonl")[-1]["uplink_bytes"]
    assert read_jsonl(tmp_path / "s" / "metrics.jsonl")[-1]["uplink_bytes"] > 0.9 * up_f  # nothing saved at k = all


def test_options_are_validated():
    for bad in ("strategy.density=0.0", "strategy.density=1.5", "strategy.beta=0.0", "strategy.server_lr=0"):
        with pytest.raises(ConfigError, match="strategy"):
            make_strategy(tiny(['strategy.name="scalecom"', bad]))


@pytest.mark.parametrize("name", ["scalecom", "dct_lowrank"])
def test_byzantine_attacks_are_refused_before_the_run(name):
    with pytest.raises(ConfigError, match="faults"):
        make_strategy(tiny([f'strategy.name="{name}"', "faults.byzantine_clients=[1]", 'faults.attack="sign_flip"']))
