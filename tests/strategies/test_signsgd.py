"""signsgd / mediansgd (strategies/signsgd.py) through the local engine: wire format, validation,
exact steps, Byzantine clients. The shared gradient plumbing is tested in test_gradients.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedsim.data.federation import federation_of
from fedsim.engines.local import run_local
from fedsim.errors import ClientUpdateError, ConfigError
from fedsim.models import build_model
from fedsim.results import load_checkpoint, read_jsonl
from fedsim.rng import derive_seed, numpy_rng
from fedsim.strategies.base import make_strategy
from fedsim.strategies.gradients import ParamLayout, flat_gradient
from fedsim.strategies.signsgd_math import majority_vote, noisy_sign, packed_size
from fedsim.wire import from_numpy
from tests.conftest import tiny

N = 5


def scenario(name: str = "signsgd", *sets: str):
    return tiny([f'strategy.name="{name}"', f"data.num_clients={N}", f"strategy.min_train_clients={N}",
                 "run.rounds=2", *sets])


def run(tmp_path, s, tag: str = "run"):
    out = tmp_path / tag
    summary = run_local(s, out)
    assert summary["status"] == "completed", summary
    return read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "clients.jsonl"), out


def final_model(out) -> list[np.ndarray]:
    return load_checkpoint(sorted((out / "checkpoints").glob("round_*.npz"))[-1])["model"]


def client_gradients(s) -> tuple[list[np.ndarray], list[torch.nn.Module]]:
    """Each client's full-batch gradient at the initial model, computed here independently."""
    fed = federation_of(s)
    ds = fed.dataset
    model = build_model(s.model, tuple(ds.input_shape), ds.num_classes, derive_seed(s.run.seed, "model-init"))
    grads = []
    for idx in fed.client_indices:
        x = torch.tensor(ds.x_train[idx], dtype=torch.float32)
        y = torch.tensor(ds.y_train[idx], dtype=torch.long)
        grads.append(flat_gradient(model, x, y)[0].double().numpy())
    init = [p.detach().numpy().copy() for p in model.state_dict().values()]
    return grads, init


# ------------------------------------------------------------------------------------ wire
@pytest.mark.parametrize("name, per_client", [("signsgd", lambda d: math.ceil(d / 8)), ("mediansgd", lambda d: 4 * d)])
def test_uplink_bytes_per_client_and_per_round(tmp_path, name, per_client):
    s = scenario(name, "strategy.b=0.01")
    d = ParamLayout.from_scenario(s).dim
    rows, clients, _ = run(tmp_path, s)
    assert all(c["status"] == "ok" for c in clients)
    assert {c["uplink-bytes"] for c in clients} == {per_client(d)}
    for r in rows[1:]:
        assert r["uplink-bytes"] == N * per_client(d)
        assert r["uplink-bytes-per-client"] == per_client(d)
    if name == "signsgd":
        assert per_client(d) == packed_size(d) and d % 8  # the padding-bit check is exercised


def test_same_seed_identical_and_noise_changes_the_run(tmp_path):
    def metrics(tag, *sets):
        rows, _, out = run(tmp_path, scenario("signsgd", *sets), tag)
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows], final_model(out)

    a, wa = metrics("a", "strategy.b=0.05")
    b, wb = metrics("b", "strategy.b=0.05")
    plain, wp = metrics("plain", "strategy.b=0")
    assert a == b
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb))
    assert a[-1]["test_loss"] != plain[-1]["test_loss"]
    assert any(not np.array_equal(x, y) for x, y in zip(wa, wp))


def test_noisy_sign_round_is_exactly_the_majority_vote_step(tmp_path):
    s = scenario("signsgd", "strategy.b=0.01", "strategy.delta=0.02", "run.rounds=1")
    _, _, out = run(tmp_path, s)
    grads, init = client_gradients(s)
    signs = [noisy_sign(g, 0.01, numpy_rng(s.run.seed, "gradient-noise", 1, pid), zero="random")
             for pid, g in enumerate(grads)]
    vote = majority_vote(signs)
    assert np.all(vote != 0)  # 5 voters (odd) and b > 0: no ties
    new = final_model(out)
    flat_new = np.concatenate([a.ravel() for a in new]).astype(np.float64)
    flat_init = np.concatenate([a.ravel() for a in init]).astype(np.float64)
    np.testing.assert_allclose(flat_new, (flat_init - 0.02 * vote).astype(np.float32), atol=1e-7)


def test_plain_median_round_is_exactly_the_median_step_with_decay(tmp_path):
    s = scenario("mediansgd", "strategy.b=0", "strategy.delta=0.5", "strategy.decay=0.5", "run.rounds=1")
    rows, _, out = run(tmp_path, s)
    grads, init = client_gradients(s)
    median = np.median(np.stack([g.astype(np.float32) for g in grads]).astype(np.float64), axis=0)
    flat_init = np.concatenate([a.ravel() for a in init]).astype(np.float64)
    flat_new = np.concatenate([a.ravel() for a in final_model(out)]).astype(np.float64)
    np.testing.assert_allclose(flat_new, flat_init - 0.5 * median, atol=1e-6)
    assert rows[1]["step-size"] == 0.5


def test_step_size_decays_and_minibatch_is_used(tmp_path):
    rows, clients, _ = run(tmp_path, scenario("signsgd", "strategy.delta=0.1", "strategy.decay=0.5",
                                              "strategy.batch_size=8", "run.rounds=3"))
    assert [r["step-size"] for r in rows[1:]] == [0.1, 0.05, 0.025]
    assert {c["num_examples"] for c in clients} == {8}


# ------------------------------------------------------------------------------------ validation
@pytest.fixture(scope="module")
def strategies():
    return {name: make_strategy(scenario(name)) for name in ("signsgd", "mediansgd")}


def _content(record: str, arrays: dict) -> RecordDict:
    return RecordDict({record: ArrayRecord({k: v if isinstance(v, Array) else from_numpy(v)
                                            for k, v in arrays.items()})})


def test_sign_reply_validation(strategies):
    st = strategies["signsgd"]
    d = st.layout.dim
    good = np.zeros(packed_size(d), dtype=np.uint8)
    assert st.parse_reply(_content("signs", {"packed": good}), {}, 0)[0].size == packed_size(d)
    padded = good.copy()
    padded[-1] = 0xFF
    lying = Array(dtype="uint8", shape=(packed_size(d) + 1,), stype="numpy.ndarray", data=from_numpy(good).data)
    bad = {
        "missing": RecordDict({"other": ArrayRecord({"packed": from_numpy(good)})}),
        "dtype": _content("signs", {"packed": good.astype(np.int8)}),
        "length": _content("signs", {"packed": good[:-1]}),
        "2-d": _content("signs", {"packed": good.reshape(1, -1)}),
        "padding": _content("signs", {"packed": padded}),
        "extra array": _content("signs", {"packed": good, "more": good}),
        "header lies": _content("signs", {"packed": lying}),
    }
    for case, content in bad.items():
        with pytest.raises(ClientUpdateError) as err:
            st.parse_reply(content, {}, 3)
        assert err.value.client == 3, case


def test_median_reply_validation(strategies):
    st = strategies["mediansgd"]
    d = st.layout.dim
    good = np.zeros(d, dtype=np.float32)
    assert st.parse_reply(_content("noisy", {"g": good}), {}, 0)[0].shape == (d,)
    nan = good.copy()
    nan[3] = np.nan
    for case, content in {"dtype": _content("noisy", {"g": good.astype(np.float64)}),
                          "shape": _content("noisy", {"g": good[:-1]}),
                          "nan": _content("noisy", {"g": nan}),
                          "inf": _content("noisy", {"g": np.full(d, np.inf, dtype=np.float32)}),
                          "missing": RecordDict({})}.items():
        with pytest.raises(ClientUpdateError):
            st.parse_reply(content, {}, 1)


@pytest.mark.parametrize("name", ["signsgd", "mediansgd"])
def test_corrupt_client_is_recorded_invalid_and_the_round_goes_on(tmp_path, name):
    rows, clients, _ = run(tmp_path, scenario(name, "strategy.b=0.01", "faults.byzantine_clients=[1]",
                                              'faults.attack="nan"'))
    bad = [c for c in clients if c["status"] != "ok"]
    assert {(c["client"], c["status"]) for c in bad} == {(1, "invalid")}
    assert len(bad) == 2 and all(r["num-clients"] == N - 1 for r in rows[1:])
    assert all(r["uplink-bytes"] == (N - 1) * rows[1]["uplink-bytes-per-client"] for r in rows[1:])
    assert np.isfinite(rows[-1]["test_loss"])


def test_sign_flip_client_votes_against_its_own_gradient(tmp_path):
    # b = 0 and one round: client 1's signs are those of -g_1 (fedsim.faults.attack_gradient), the
    # others' those of g_i; the step is the majority vote of exactly those signs.
    s = scenario("signsgd", "strategy.b=0", "strategy.delta=0.02", "run.rounds=1", 'strategy.zero="positive"',
                 "faults.byzantine_clients=[1]", 'faults.attack="sign_flip"')
    _, clients, out = run(tmp_path, s)
    assert all(c["status"] == "ok" for c in clients)
    grads, init = client_gradients(s)
    grads[1] = -grads[1]
    vote = majority_vote([noisy_sign(g, 0.0, numpy_rng(0), zero="positive") for g in grads])
    flat_new = np.concatenate([a.ravel() for a in final_model(out)]).astype(np.float64)
    flat_init = np.concatenate([a.ravel() for a in init]).astype(np.float64)
    np.testing.assert_allclose(flat_new, (flat_init - 0.02 * vote).astype(np.float32), atol=1e-7)


def test_options_and_model_are_checked():
    with pytest.raises(ConfigError):
        scenario("signsgd", "strategy.b=-1")
    with pytest.raises(ConfigError):
        scenario("signsgd", 'strategy.zero="maybe"')
    with pytest.raises(ConfigError):
        scenario("mediansgd", 'strategy.zero="random"')      # a sign-only option
    with pytest.raises(ConfigError):
        scenario("mediansgd", "strategy.decay=1.5")
    with pytest.raises(ConfigError, match="BatchNorm"):
        make_strategy(scenario("signsgd", 'model.name="cnn"', 'model.norm="batch"', "model.channels=[4]"))

