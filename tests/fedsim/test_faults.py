"""The fault model (``fedsim.faults``): attacks do what they say, honest clients pass through."""

from statistics import NormalDist
from typing import get_args

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsim import faults
from fedsim.catalog import registries
from fedsim.config import FaultsConfig, scenario_from_dict
from fedsim.errors import ClientFailure, ConfigError, FailedRoundError
from fedsim.strategies.base import ClientUpdate
from tests.conftest import tiny


def _weights(rng):
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "n": np.array([5], dtype=np.int64)}


# ----------------------------------------------------------------------------- names and schema
def test_schema_accepts_exactly_the_implemented_attacks():
    assert get_args(FaultsConfig.model_fields["attack"].annotation) == ("none", *faults.ATTACKS)


@pytest.mark.parametrize("name", ["fang", "ALIE", "lie", "minmax", ""])
def test_unknown_attack_names_are_refused(name):
    with pytest.raises(ConfigError) as ei:
        scenario_from_dict({"faults": {"attack": name, "byzantine_clients": [0]}})
    assert ei.value.key == "faults.attack" and "min_max" in str(ei.value)


def test_attack_strength_is_refused_where_it_has_no_effect():
    for attack in ("alie", "min_max", "label_flip", "sign_flip", "none"):
        with pytest.raises(ConfigError) as ei:
            scenario_from_dict({"faults": {"attack": attack, "attack_strength": 0.5}})
        assert ei.value.key == "faults.attack_strength"
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError):
            scenario_from_dict({"faults": {"attack": "ipm", "attack_strength": bad}})
    s = tiny(["faults.byzantine_clients=[1]", 'faults.attack="ipm"', "faults.attack_strength=2.5"])
    assert faults.attack_strength(s) == 2.5
    assert faults.attack_strength(tiny(["faults.byzantine_clients=[1]", 'faults.attack="ipm"'])) == 0.1


# ----------------------------------------------------------------------------- client side
@pytest.mark.parametrize("attack", faults.CLIENT_ATTACKS)
def test_byzantine_weights_attacks(attack):
    s = tiny(["faults.byzantine_clients=[1]", f'faults.attack="{attack}"'])
    rng = np.random.default_rng(0)
    w, g = _weights(rng), _weights(rng)
    honest = faults.attack_weights(s, 2, 0, w, g)
    assert honest is w
    bad = faults.attack_weights(s, 2, 1, w, g)
    np.testing.assert_array_equal(bad["n"], w["n"])  # integer buffers pass unchanged
    if attack == "sign_flip":
        np.testing.assert_array_equal(bad["w"], g["w"] - (w["w"] - g["w"]))
    elif attack == "gaussian":
        assert not np.allclose(bad["w"], g["w"]) and np.isfinite(bad["w"]).all()
        again = faults.attack_weights(s, 2, 1, w, g)
        np.testing.assert_array_equal(bad["w"], again["w"])  # seeded per (round, client)
    else:
        assert np.isnan(bad["w"]).all()


def test_gaussian_strength_is_sigma():
    w = {"w": np.zeros((200, 50), dtype=np.float32)}
    spread = [float(faults.attack_weights(tiny(["faults.byzantine_clients=[1]", 'faults.attack="gaussian"', *x]),
                                          1, 1, w, w)["w"].std()) for x in ([], ["faults.attack_strength=5.0"])]
    assert spread[0] == pytest.approx(1.0, rel=0.05) and spread[1] == pytest.approx(5.0, rel=0.05)


@pytest.mark.parametrize("attack", faults.CLIENT_ATTACKS)
def test_byzantine_gradient_attacks(attack):
    s = tiny(["faults.byzantine_clients=[1]", f'faults.attack="{attack}"'])
    g = np.arange(4.0)
    assert faults.attack_gradient(s, 1, 0, g) is g
    bad = faults.attack_gradient(s, 1, 1, g)
    if attack == "sign_flip":
        np.testing.assert_array_equal(bad, -g)
    elif attack == "gaussian":
        assert bad.shape == g.shape and not np.array_equal(bad, g)
    else:
        assert np.isnan(bad).all()


@pytest.mark.parametrize("attack", faults.DATA_ATTACKS + faults.OMNISCIENT_ATTACKS)
def test_other_attacks_leave_what_the_client_sends_alone(attack):
    s = tiny(["faults.byzantine_clients=[1]", f'faults.attack="{attack}"'])
    w = _weights(np.random.default_rng(0))
    assert faults.attack_weights(s, 1, 1, w, w) is w
    g = np.arange(3.0)
    assert faults.attack_gradient(s, 1, 1, g) is g


def test_label_flip_maps_y_to_c_minus_1_minus_y():
    s = tiny(["faults.byzantine_clients=[1]", 'faults.attack="label_flip"'])
    y = torch.tensor([0, 3, 9, 9])
    flipped = faults.flip_labels(s, 1, y, 10)
    assert flipped.tolist() == [9, 6, 0, 0] and y.tolist() == [0, 3, 9, 9]  # never in place
    assert faults.flip_labels(s, 0, y, 10) is y  # honest
    np.testing.assert_array_equal(faults.flip_labels(s, 1, np.array([1, 2]), 3), [1, 0])
    other = tiny(["faults.byzantine_clients=[1]", 'faults.attack="sign_flip"'])
    assert faults.flip_labels(other, 1, y, 10) is y


def test_label_flip_reaches_the_training_data_only():
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedsim.clients.batched import message_eligible
    from fedsim.clients.client_app import build_client_app
    from fedsim.clients.runtime import runtime_for
    from fedsim.clients.tasks import ClientCall
    from fedsim.engines.local import LocalGrid, node_id_for
    from fedsim.wire import state_to_arrays

    s = tiny(["faults.byzantine_clients=[1]", 'faults.attack="label_flip"'])
    grid = LocalGrid(build_client_app(s), 4)
    arrays = state_to_arrays(runtime_for(s).model)

    def call(pid, kind):
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "plugins": ""})}),
                      dst_node_id=node_id_for(pid), message_type=kind)
        return ClientCall(runtime_for(s), msg, grid.contexts[node_id_for(pid)])

    _, y_true = runtime_for(s).client_data(1)
    assert torch.equal(call(1, "train").data()[1], 9 - y_true)
    assert torch.equal(call(1, "train.noisy_gradient").data()[1], 9 - y_true)
    assert torch.equal(call(1, "evaluate").data()[1], y_true)
    assert torch.equal(call(0, "train").data()[1], runtime_for(s).client_data(0)[1])
    assert not message_eligible(call(1, "train")) and message_eligible(call(0, "train"))  # per-message path


# ----------------------------------------------------------------------------- omniscient math
@pytest.mark.parametrize("n, f", [(10, 1), (10, 3), (20, 4), (5, 2), (4, 2), (10, 6), (1, 1)])
def test_alie_z_is_the_papers_formula(n, f):
    z = faults.alie_z(n, f)
    s = max(n // 2 + 1 - f, 1)
    assert z >= 0
    if (n - s) / n > 0.5:
        assert NormalDist().cdf(z) == pytest.approx((n - s) / n)
    assert faults.alie_z(10, 3) == pytest.approx(0.5244005127)  # Φ⁻¹(0.7): s = 6 − 3 supporters


def test_alie_and_ipm_on_small_arrays():
    x = np.array([[1.0, 2.0, 0.0], [3.0, 2.0, 4.0], [2.0, 5.0, 2.0]])
    v, z = faults.alie(x, 5, 2)
    mu, sd = x.mean(0), x.std(0)
    assert z == pytest.approx(NormalDist().inv_cdf(4 / 5))  # s = ⌊5/2 + 1⌋ − 2 = 1: Φ(z) = (5 − 1)/5
    np.testing.assert_allclose(v, mu - z * sd)
    np.testing.assert_allclose(v, [2 - z * np.sqrt(2 / 3), 3 - z * np.sqrt(2), 2 - z * np.sqrt(8 / 3)])
    np.testing.assert_allclose(faults.ipm(x, 0.5), [-1.0, -1.5, -1.0])


matrices = st.integers(2, 6).flatmap(lambda m: st.integers(1, 5).flatmap(
    lambda d: arrays(np.float64, (m, d), elements=st.floats(-10, 10, allow_nan=False, width=32))))


def _max_dist(v, x):
    return float(np.max(np.sum((x - v) ** 2, axis=1)))


def _sum_dist(v, x):
    return float(np.sum((x - v) ** 2))


@settings(max_examples=200, deadline=None)
@given(matrices)
def test_min_max_gamma_is_the_largest_that_keeps_the_papers_bound(x):
    v, gamma = faults.min_max(x)
    p = -x.std(0)
    np.testing.assert_allclose(v, x.mean(0) + gamma * p, atol=1e-9)
    pair = max(_max_dist(a, x) for a in x)  # max_{i,j} ‖x_i − x_j‖²
    assert _max_dist(v, x) <= pair * (1 + 1e-9) + 1e-9
    if gamma > 0 and p @ p > 1e-12:
        assert _max_dist(x.mean(0) + gamma * 1.001 * p, x) > pair * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(matrices)
def test_min_sum_gamma_is_the_largest_that_keeps_the_papers_bound(x):
    v, gamma = faults.min_sum(x)
    p = -x.std(0)
    np.testing.assert_allclose(v, x.mean(0) + gamma * p, atol=1e-9)
    bound = max(_sum_dist(a, x) for a in x)  # max_i Σ_j ‖x_i − x_j‖²
    assert _sum_dist(v, x) <= bound * (1 + 1e-9) + 1e-9
    if gamma > 0 and p @ p > 1e-12:
        assert _sum_dist(x.mean(0) + gamma * 1.001 * p, x) > bound * (1 + 1e-9)


def test_min_max_and_min_sum_on_a_small_example():
    x = np.array([[0.0, 0.0], [2.0, 0.0]])  # μ = (1, 0), σ = (1, 0), p = (−1, 0)
    v, g = faults.min_max(x)  # max_i ‖μ + γp − x_i‖ = 1 + γ ≤ 2
    assert g == pytest.approx(1.0) and np.allclose(v, [0.0, 0.0])
    v, g = faults.min_sum(x)  # (1 + γ)² + (1 − γ)² ≤ 4
    assert g == pytest.approx(1.0) and np.allclose(v, [0.0, 0.0])
    same = np.ones((3, 2))  # no spread: no direction, the mean
    assert faults.min_max(same)[1] == 0.0 and np.allclose(faults.min_sum(same)[0], 1.0)


# ----------------------------------------------------------------------------- server side
class _ModelStrategy:
    name = "fake"
    train_action = "train"

    def __init__(self, scenario, current):
        self.scenario, self.current = scenario, current


class _MedianStrategy(_ModelStrategy):
    train_action = "train.noisy_gradient"
    mode = "median"


def _update(pid, arrays):
    return ClientUpdate(pid, 100 + pid, arrays, 10 + pid, {"train_loss": 1.0}, None)


@pytest.mark.parametrize("attack", faults.OMNISCIENT_ATTACKS)
def test_omniscient_attack_replaces_byzantine_model_updates_only(attack):
    s = tiny(["faults.byzantine_clients=[1, 3]", f'faults.attack="{attack}"'])
    rng = np.random.default_rng(1)
    glob = [rng.normal(size=(2, 3)).astype(np.float32), np.array([7], dtype=np.int64)]
    ups = [_update(p, [rng.normal(size=(2, 3)).astype(np.float32), np.array([p], dtype=np.int64)]) for p in range(4)]
    out = faults.apply_omniscient_attack(_ModelStrategy(s, glob), 1, ups)
    assert [u.partition_id for u in out] == [0, 1, 2, 3]
    assert out[0] is ups[0] and out[2] is ups[2]  # honest clients untouched
    honest = np.stack([(ups[i].arrays[0].astype(np.float64) - glob[0]).ravel() for i in (0, 2)])
    want, scale = faults.omniscient_update(attack, honest, 4, 2, faults.attack_strength(s))
    for i in (1, 3):
        np.testing.assert_allclose(out[i].arrays[0], (glob[0] + want.reshape(2, 3)).astype(np.float32), atol=1e-6)
        assert out[i].arrays[0].dtype == np.float32
        np.testing.assert_array_equal(out[i].arrays[1], [i])  # its own integer buffer
        assert out[i].metrics["attack-scale"] == pytest.approx(scale) and out[i].num_examples == 10 + i
        assert not np.allclose(out[i].arrays[0], ups[i].arrays[0])


def test_omniscient_attack_on_median_sgd_uses_the_vector_itself():
    s = tiny(["faults.byzantine_clients=[0]", 'faults.attack="ipm"', "faults.attack_strength=2.0"])
    ups = [_update(p, [np.full(3, float(p + 1), dtype=np.float32)]) for p in range(3)]
    out = faults.apply_omniscient_attack(_MedianStrategy(s, []), 5, ups)
    np.testing.assert_allclose(out[0].arrays[0], [-5.0, -5.0, -5.0])  # −2 · mean(2, 3)
    assert out[1] is ups[1] and out[2] is ups[2]


@pytest.mark.parametrize("attack", ("none", *faults.CLIENT_ATTACKS, *faults.DATA_ATTACKS))
def test_non_omniscient_attacks_pass_through_the_server(attack):
    byz = "[1]" if attack != "none" else "[]"
    s = tiny([f"faults.byzantine_clients={byz}", f'faults.attack="{attack}"'])
    ups = [_update(p, [np.ones(2, dtype=np.float32)]) for p in range(3)]
    assert faults.apply_omniscient_attack(_ModelStrategy(s, [np.zeros(2, np.float32)]), 1, ups) is ups


# ----------------------------------------------------------------------------- preflight
def _cls(name):
    return registries()["strategies"].get(name)


@pytest.mark.parametrize("sets, key", [
    (["faults.byzantine_clients=[1]"], "faults.byzantine_clients"),  # Byzantine, attack "none"
    (['faults.attack="alie"'], "faults.attack"),  # an attack, nobody attacking
    (["faults.byzantine_clients=[4]", 'faults.attack="alie"'], "faults.byzantine_clients"),  # 4 clients: 0..3
    (["faults.byzantine_clients=[-1]", 'faults.attack="ipm"'], "faults.byzantine_clients"),
    (["faults.byzantine_clients=[1, 1]", 'faults.attack="ipm"'], "faults.byzantine_clients"),
])
def test_check_attack_refuses_settings_that_would_do_nothing(sets, key):
    s = scenario_from_dict({"data": {"num_clients": 4}}, sets)
    with pytest.raises(ConfigError) as ei:
        faults.check_attack(s, _cls("fedavg"))
    assert ei.value.key == key


@pytest.mark.parametrize("strategy, attack, ok", [
    ("fedavg", "min_sum", True), ("krum", "alie", True), ("dp_fedavg", "ipm", True),
    ("mediansgd", "min_max", True), ("mediansgd", "label_flip", True),
    ("signsgd", "sign_flip", True), ("signsgd", "label_flip", True),
    ("signsgd", "alie", False), ("signsgd", "ipm", False),
    ("semifl", "sign_flip", False), ("semifl", "label_flip", False),
    ("coded_gd", "gaussian", False), ("coded_gd", "alie", False),
])
def test_check_attack_knows_what_each_strategy_can_express(strategy, attack, ok):
    s = scenario_from_dict({"faults": {"byzantine_clients": [1], "attack": attack}})
    if ok:
        faults.check_attack(s, _cls(strategy))
    else:
        with pytest.raises(ConfigError) as ei:
            faults.check_attack(s, _cls(strategy))
        assert ei.value.key == "faults.attack" and strategy in str(ei.value)


def test_crashes_and_dropouts_are_seeded_failures():
    s = tiny(["run.rounds=3", "faults.crash_clients=[2]", "faults.crash_rounds=[3]", "faults.dropout=0.5"])
    with pytest.raises(faults.InjectedCrash):
        faults.inject_failure(s, 3, 2)
    outcomes = []
    for rnd in range(1, 30):
        try:
            faults.inject_failure(s, rnd, 0)
            outcomes.append(False)
        except ClientFailure:
            outcomes.append(True)
    assert 0 < sum(outcomes) < len(outcomes)


def test_straggler_time_is_steps_times_slowdown():
    s = tiny(["faults.stragglers=1.0", "faults.straggler_slowdown=4.0"])
    assert faults.simulated_time(s, 1, 0, 10) == 40.0
    assert faults.simulated_time(tiny(), 1, 0, 10) == 10.0


# ----------------------------------------------------------------------------- end to end
def _run(s, out):
    from fedsim.engines.local import run_local
    from fedsim.results import load_checkpoint, read_jsonl

    summary = run_local(s, out)
    assert summary["status"] == "completed", summary
    model = load_checkpoint(out / "checkpoints" / f"round_{s.run.rounds:04d}.npz")["model"]
    return model, read_jsonl(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def clean_fedavg(tmp_path_factory):
    return _run(tiny(), tmp_path_factory.mktemp("clean"))


@pytest.mark.slow
@pytest.mark.parametrize("attack", faults.ATTACKS)
def test_every_accepted_attack_changes_the_fedavg_model(attack, clean_fedavg, tmp_path):
    s = tiny(["faults.byzantine_clients=[0, 1]", f'faults.attack="{attack}"'])
    faults.check_attack(s, _cls("fedavg"))
    model, rows = _run(s, tmp_path)
    diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(model, clean_fedavg[0]))
    assert diff > 1e-3, f"attack {attack} left the model within {diff:.2g} of the clean run"
    scales = [r.get("attack-scale") for r in rows if r["round"] > 0]
    assert all(x is not None and x > 0 for x in scales) == (attack in faults.OMNISCIENT_ATTACKS)


@pytest.mark.slow
def test_attacked_runs_are_deterministic(tmp_path):
    s = tiny(["faults.byzantine_clients=[2]", 'faults.attack="min_max"'])
    a, b = _run(s, tmp_path / "a")[0], _run(s, tmp_path / "b")[0]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def _received(monkeypatch, cls, s, out) -> dict[int, list[np.ndarray]]:
    """What ``cls.aggregate`` received in round 1 from each client of a run of ``s``."""
    from fedsim.engines.local import run_local

    seen: dict[int, list[np.ndarray]] = {}
    original = cls.aggregate

    def spy(self, server_round, updates):
        if server_round == 1:
            seen.update({u.partition_id: [np.array(a) for a in u.arrays] for u in updates})
        return original(self, server_round, updates)

    monkeypatch.setattr(cls, "aggregate", spy)
    try:
        assert run_local(s, out)["status"] == "completed"
    except FailedRoundError as err:  # a defence may refuse the round (Krum with fewer than 2f + 3 valid
        assert "refused to aggregate" in str(err), err  # replies once the attack's are invalid): what it
    monkeypatch.setattr(cls, "aggregate", original)  # received is still what the attack made of them
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(registries()["strategies"].names()))
def test_every_strategy_refuses_or_really_receives_each_attack(name, monkeypatch, tmp_path):
    """An accepted attack that does nothing is impossible: either ``check_attack`` refuses it before the
    run, or what the aggregator gets from the Byzantine client differs from its honest reply (the
    final model may still match: a defence may have discarded it, which is the defence's merit)."""
    cls = _cls(name)
    base = [f'strategy.name="{name}"', "data.num_clients=6", "strategy.min_train_clients=6", "run.rounds=1",
            *getattr(cls, "tiny_overrides", ())]
    clean = None
    for attack in faults.ATTACKS:
        try:  # tiny() resolves the scenario, and the resolver calls check_attack
            s = tiny([*base, "faults.byzantine_clients=[1, 4]", f'faults.attack="{attack}"'])
            faults.check_attack(s, cls)
        except ConfigError:
            continue
        if clean is None:
            clean = _received(monkeypatch, cls, tiny(base), tmp_path / "clean")
        got = _received(monkeypatch, cls, s, tmp_path / attack)
        for pid in (0, 2):  # honest clients send what they send in the clean run
            assert all(np.array_equal(a, b) for a, b in zip(got[pid], clean[pid])), (attack, pid)
        for pid in (1, 4):
            assert pid not in got or any(not np.array_equal(a, b) for a, b in zip(got[pid], clean[pid])), \
                f"{name}: attack {attack} reached the aggregator unchanged from client {pid}"
