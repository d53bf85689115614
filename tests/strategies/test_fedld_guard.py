"""FedLD's regime diagnostic and alignment guard (issue 12): guard off = the paper bit for bit,
identical updates -> the mean, permutation invariance, orthogonal updates -> the plain mean, the
blend weight, and the metrics a run reports."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.engines.local import run_local
from fedsim.errors import ConfigError
from fedsim.results import load_checkpoint, read_jsonl
from fedsim.strategies.fedld_math import FedLDAggregator, fedld_aggregate, guard_weight, update_alignment
from tests.conftest import tiny

SETTINGS = settings(max_examples=40, deadline=None)


def clients(seed: int, m: int, shapes=((4, 3), (3,)), common: float = 0.0) -> list[dict[str, np.ndarray]]:
    """``m`` float32 client deltas (a weight and a bias key); ``common`` mixes in a shared direction."""
    rng = np.random.default_rng(seed)
    shared = {f"k{j}": rng.standard_normal(s) for j, s in enumerate(shapes)}
    return [{k: (common * shared[k] + rng.standard_normal(v.shape)).astype(np.float32) for k, v in shared.items()}
            for _ in range(m)]


def with_cosine(c: float, m: int, d: int = 40, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``m`` unit updates with every pairwise cosine exactly ``c`` (float64)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, m + 1)))
    return [{"w": np.sqrt(c) * Q[:, 0] + np.sqrt(1 - c) * Q[:, i + 1]} for i in range(m)]


def two_rounds(agg: FedLDAggregator, rounds) -> list:
    return [agg.aggregate_deltas(r) for r in rounds]


# ------------------------------------------------------------------------------------ guard off
@SETTINGS
@given(st.integers(0, 2**16), st.integers(2, 9), st.sampled_from([0.0, 0.5, 3.0]), st.sampled_from([0.5, 0.8, 1.0]))
def test_guard_off_is_the_paper_bit_for_bit(seed, m, common, kappa):
    rounds = [clients(seed + r, m, common=common) for r in range(3)]
    agg, seen = FedLDAggregator(kappa=kappa, guard="none"), {}
    for deltas in rounds:
        paper = fedld_aggregate(deltas, kappa, dict(seen))      # the paper's function, unchanged
        got = agg.aggregate_deltas(deltas)
        for k in paper:
            assert got[k].dtype == paper[k].dtype and np.array_equal(got[k], paper[k])
            seen[k] = seen.get(k, False) or bool(np.any(paper[k] != 0))
        assert agg.diagnostics["weight"] == 1.0
    assert agg.seen == seen


# ------------------------------------------------------------------------------------ guard on
@SETTINGS
@given(st.integers(0, 2**16), st.integers(1, 8), st.sampled_from([1e-3, 1.0, 1e3]))
def test_identical_updates_give_the_mean(seed, m, scale):
    g = {k: (v * scale) for k, v in clients(seed, 1)[0].items()}
    agg = FedLDAggregator(guard="alignment")
    for _ in range(2):                                          # round 1: mean; round 2: principal directions
        out = agg.aggregate_deltas([dict(g) for _ in range(m)])
        for k in g:
            np.testing.assert_allclose(out[k], g[k], rtol=1e-5, atol=1e-6 * scale)
    assert agg.diagnostics["alignment"] == pytest.approx(1.0) and agg.diagnostics["weight"] == 1.0
    assert agg.diagnostics["step-cosine"] == pytest.approx(1.0, abs=1e-6)


@SETTINGS
@given(st.integers(0, 2**16), st.integers(2, 8), st.sampled_from([0.0, 1.0, 3.0]),
       st.sampled_from(["none", "alignment"]))
def test_permutation_invariance(seed, m, common, guard):
    rounds = [clients(seed + r, m, common=common) for r in range(2)]
    perm = np.random.default_rng(seed).permutation(m)
    a, b = FedLDAggregator(guard=guard), FedLDAggregator(guard=guard)
    for deltas in rounds:
        x, y = a.aggregate_deltas(deltas), b.aggregate_deltas([deltas[i] for i in perm])
        for k in x:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-4, atol=1e-5)
        assert a.diagnostics == pytest.approx(b.diagnostics, abs=1e-6)


def test_orthogonal_updates_fall_back_to_the_plain_mean():
    deltas = [{"w": np.eye(12, dtype=np.float32)[i] * (1 + i)} for i in range(12)]
    mean = np.mean([d["w"].astype(np.float64) for d in deltas], axis=0).astype(np.float32)
    paper, guarded = FedLDAggregator(guard="none"), FedLDAggregator(guard="alignment")
    for agg in (paper, guarded):
        agg.aggregate_deltas(deltas)                            # round 1 is the mean for both
    p, g = paper.aggregate_deltas(deltas), guarded.aggregate_deltas(deltas)
    assert np.array_equal(g["w"], mean)                         # weight 0: exactly the plain mean
    assert guarded.diagnostics == {"alignment": 0.0, "weight": 0.0, "step-cosine": pytest.approx(1.0),
                                   "step-ratio": pytest.approx(1.0)}
    assert paper.diagnostics["alignment"] == 0.0 and paper.diagnostics["weight"] == 1.0
    assert paper.diagnostics["step-cosine"] < 0.99 and not np.allclose(p["w"], mean)   # the paper's step


@pytest.mark.parametrize("c", [0.05, 0.2, 0.35])
def test_partial_alignment_blends_the_paper_and_the_mean(c):
    deltas = with_cosine(c, m=6)
    assert update_alignment(np.stack([d["w"] for d in deltas]) @ np.stack([d["w"] for d in deltas]).T) == \
        pytest.approx(c)
    paper, guarded = FedLDAggregator(), FedLDAggregator(guard="alignment", min_alignment=0.4)
    for agg in (paper, guarded):
        agg.aggregate_deltas(deltas)
    p, g = paper.aggregate_deltas(deltas)["w"], guarded.aggregate_deltas(deltas)["w"]
    w = c / 0.4
    assert guarded.diagnostics["weight"] == pytest.approx(w)
    np.testing.assert_allclose(g, w * p + (1 - w) * np.mean([d["w"] for d in deltas], axis=0), atol=1e-12)


def test_update_alignment_and_guard_weight():
    G = np.random.default_rng(0).standard_normal((5, 30))
    gram = G @ G.T
    a = update_alignment(gram)
    assert a == pytest.approx(update_alignment((3 * G) @ (3 * G).T))               # scale-free
    P = np.random.default_rng(1).permutation(5)
    assert a == pytest.approx(update_alignment(gram[np.ix_(P, P)]))                # permutation-free
    Z = np.vstack([G[:2], np.zeros((1, 30))])                                     # a zero update
    cos01 = (G[0] @ G[1]) / np.linalg.norm(G[0]) / np.linalg.norm(G[1])
    assert update_alignment(Z @ Z.T) == pytest.approx(float(np.median([cos01, 0.0, 0.0])))
    assert update_alignment(np.ones((1, 1))) == 1.0
    assert [guard_weight(x, 0.5) for x in (-0.3, 0.0, 0.25, 0.5, 0.9)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="min_alignment"):
            guard_weight(0.3, bad)
    with pytest.raises(ConfigError, match="guard"):
        FedLDAggregator(guard="median")


def test_state_round_trip_keeps_the_guard():
    agg = FedLDAggregator(guard="alignment", min_alignment=0.3)
    agg.aggregate_deltas(clients(0, 4))
    again = FedLDAggregator()
    again.load_state_dict(agg.state_dict())
    assert (again.guard, again.min_alignment, again.seen) == ("alignment", 0.3, agg.seen)


# ------------------------------------------------------------------------------------ through the engine
BASE = ['strategy.name="fedld"', "run.rounds=3", 'data.partitioner="dirichlet"', "data.partition.alpha=0.1",
        "data.partition.min_partition_size=5"]


def test_runs_report_the_regime_and_the_guard_changes_the_model(tmp_path):
    for tag, sets in (("paper", []), ("guard", ['strategy.guard="alignment"', "strategy.min_alignment=0.9"])):
        assert run_local(tiny([*BASE, *sets]), tmp_path / tag)["status"] == "completed"
    rows = {t: read_jsonl(tmp_path / t / "metrics.jsonl")[1:] for t in ("paper", "guard")}
    for tag, rs in rows.items():
        for r in rs:
            assert {"fedld-alignment", "fedld-step-cosine", "fedld-step-ratio", "fedld-weight"} <= set(r)
            assert -1.0 <= r["fedld-alignment"] <= 1.0 and 0.0 <= r["fedld-weight"] <= 1.0
        assert rs[0]["fedld-step-cosine"] == pytest.approx(1.0)               # round 1 is the mean
    assert all(r["fedld-weight"] == 1.0 for r in rows["paper"])
    assert [r["fedld-alignment"] for r in rows["paper"][:2]] == [r["fedld-alignment"] for r in rows["guard"][:2]]
    assert rows["guard"][1]["fedld-weight"] < 1.0                             # label skew: not aligned
    models = [load_checkpoint(sorted((tmp_path / t / "checkpoints").glob("round_*.npz"))[-1])["model"]
              for t in ("paper", "guard")]
    assert any(not np.array_equal(a, b) for a, b in zip(*models))


@pytest.mark.parametrize("sets, name", [(['strategy.guard="median"'], "guard"),
                                        (["strategy.min_alignment=0"], "min_alignment")])
def test_bad_guard_options_are_config_errors(sets, name):
    with pytest.raises(ConfigError, match=name) as err:
        tiny(['strategy.name="fedld"', *sets])
    assert err.value.key.startswith("strategy")
