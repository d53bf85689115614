"""dct_lowrank update compression: exact at full rank, lossless on the chosen span, bytes as expected."""

import numpy as np
import pytest

from fedsim.clients import dct
from fedsim.engines.local import run_local
from fedsim.errors import ConfigError
from fedsim.results import load_checkpoint, read_jsonl
from fedsim.strategies.base import make_strategy
from fedsim.strategies.dct_compression_math import compress, payload_bytes, rank_for, reconstruct
from tests.conftest import tiny

SHAPES = [(64, 16), (16, 64), (10, 16), (6, 3, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_reconstruction_is_exact_at_full_rank(shape):
    g = np.random.default_rng(1).normal(size=shape)
    coef, idx = compress(g, 1.0)
    np.testing.assert_allclose(reconstruct(coef, idx, shape), g, rtol=1e-5, atol=1e-5)  # float32 coefficients


def test_an_update_on_r_dct_columns_is_sent_losslessly_and_the_choice_is_the_top_l1():
    n, cols = 16, [2, 5, 11]
    q = dct.dct_matrix(n, dtype=__import__("torch").float64).numpy()
    g = np.random.default_rng(2).normal(size=(40, 3)) @ q[:, cols].T  # 40 x 16, spanned by 3 columns
    coef, idx = compress(g, 3 / 16)
    assert idx.tolist() == cols
    np.testing.assert_allclose(reconstruct(coef, idx, g.shape), g, atol=1e-5)
    score = np.abs(g @ q).sum(axis=0)
    assert set(np.argsort(-score)[:3]) == set(cols)


def test_low_rank_error_is_no_better_than_the_svd_optimum():
    g = np.random.default_rng(3).normal(size=(30, 12))
    coef, idx = compress(g, 4 / 12)
    err = np.linalg.norm(g - reconstruct(coef, idx, g.shape))
    s = np.linalg.svd(g, compute_uv=False)
    assert err >= np.sqrt((s[4:] ** 2).sum()) - 1e-6


def test_reconstruct_refuses_indices_that_do_not_fit():
    with pytest.raises(ValueError):
        reconstruct(np.zeros((64, 2)), np.array([3, 99]), (64, 16))
    with pytest.raises(ValueError):
        reconstruct(np.zeros((64, 2)), np.array([3, 3]), (64, 16))
    with pytest.raises(ValueError):
        rank_for(4, 0.0)
    with pytest.raises(ConfigError, match="strategy"):
        make_strategy(tiny(['strategy.name="dct_lowrank"', "strategy.density=2.0"]))


@pytest.mark.slow
def test_uplink_bytes_drop_by_the_payload_saved_and_full_rank_equals_fedavg(tmp_path):
    base = ["strategy.min_train_clients=4", "run.rounds=2", "run.checkpoint_every=1"]
    runs = {"fedavg": base, "dct": ['strategy.name="dct_lowrank"', "strategy.density=0.25", *base],
            "full": ['strategy.name="dct_lowrank"', "strategy.density=1.0", *base]}
    for name, o in runs.items():
        assert run_local(tiny(o), tmp_path / name)["status"] == "completed"
    up = {n: read_jsonl(tmp_path / n / "metrics.jsonl")[-1]["uplink_bytes"] for n in runs}
    shapes = [(16, 64), (16,), (10, 16), (10,)]  # the tiny MLP's state dict
    dense = sum(4 * int(np.prod(s)) for s in shapes)
    sent = sum(payload_bytes(s, 0.25) for s in shapes)
    assert sent == 4 * (64 * 4 + 4) + 64 + 4 * (16 * 2 + 2) + 40  # 64×16 → rank 4, 16×10 → rank 2 (of 10)
    saved_per_client = dense - sent
    # the measured drop is the payload saved less the headers of the two index arrays each reply adds
    # (an Array object with its .npy header and record entry: about 450 bytes each, measured 925 for both)
    drop = (up["fedavg"] - up["dct"]) / 4
    assert saved_per_client - 2 * 600 < drop < saved_per_client, (up, saved_per_client)
    assert up["full"] > up["fedavg"]  # full rank: all coefficients plus the indices
    fed = load_checkpoint(tmp_path / "fedavg" / "checkpoints" / "round_0002.npz")["model"]
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "round_0002.npz")["model"]
    for a, b in zip(fed, full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
