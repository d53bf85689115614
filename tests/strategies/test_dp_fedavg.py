"""DP-FedAvg (and DP-FTRL, which reduces to the same FedAvg) through the engine: reduce to FedAvg
without noise/clipping, clip bounds, Poisson sampling, adaptive clipping, noise seeded per round."""

import numpy as np
import pytest

from fedsim.engines.local import run_local
from fedsim.results import load_checkpoint, read_jsonl
from tests.conftest import tiny


def _ck(path, rnd=None):
    files = sorted((path / "checkpoints").glob("round_*.npz"))
    return load_checkpoint(files[-1] if rnd is None else path / "checkpoints" / f"round_{rnd:04d}.npz")


def _fedavg_uniform(tmp_path, rounds):
    run_local(tiny([f"run.rounds={rounds}", 'strategy.name="fedavg"', "strategy.weighted=false"]), tmp_path / "avg")
    return _ck(tmp_path / "avg")["model"]


@pytest.mark.parametrize("strategy, mech", [("dp_fedavg", "dp-fedavg"), ("dp_ftrl", "dp-ftrl")])
def test_without_noise_and_clipping_equals_uniform_fedavg(tmp_path, strategy, mech):
    sets = ["run.rounds=2", f'strategy.name="{strategy}"', f'privacy.mechanism="{mech}"',
            "privacy.noise_multiplier=0.0", "privacy.clip_norm=1e9", "privacy.release_counters=false"]
    sets += ['privacy.client_sampling="fixed"'] if mech == "dp-fedavg" else []  # DP-FTRL does not sample
    run_local(tiny(sets), tmp_path / "dp")
    for a, b in zip(_ck(tmp_path / "dp")["model"], _fedavg_uniform(tmp_path, 2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

def test_dp_fedavg_clips_each_update(tmp_path):
    c = 0.05
    sets = ["run.rounds=1", 'strategy.name="dp_fedavg"', 'privacy.mechanism="dp-fedavg"',
            "privacy.noise_multiplier=0.0", f"privacy.clip_norm={c}", 'privacy.client_sampling="fixed"',
            "run.checkpoint_every=1", "privacy.release_counters=false"]
    run_local(tiny(sets), tmp_path / "dp")
    # clients that train zero epochs send the initial model back: FedAvg of them is the initial model
    run_local(tiny(["run.rounds=1", "client.epochs=0"]), tmp_path / "init")
    w1 = np.concatenate([a.ravel() for a in _ck(tmp_path / "dp")["model"] if a.dtype.kind == "f"])
    w0 = np.concatenate([a.ravel() for a in _ck(tmp_path / "init")["model"] if a.dtype.kind == "f"])
    assert np.linalg.norm(w1 - w0) <= c + 1e-6  # mean of updates each clipped to c
    row = read_jsonl(tmp_path / "dp" / "metrics.jsonl")[-1]
    assert row["dp/median_update_norm"] > c  # the clip was active

def test_poisson_client_sampling_varies_and_is_seeded(tmp_path):
    sets = ["run.rounds=4", 'strategy.name="dp_fedavg"', 'privacy.mechanism="dp-fedavg"',
            "privacy.noise_multiplier=0.5", "strategy.fraction_train=0.5", "privacy.release_counters=false"]
    run_local(tiny(sets), tmp_path / "a")
    run_local(tiny(sets), tmp_path / "b")
    ca = [(c["round"], c["client"]) for c in read_jsonl(tmp_path / "a" / "clients.jsonl")]
    cb = [(c["round"], c["client"]) for c in read_jsonl(tmp_path / "b" / "clients.jsonl")]
    assert ca == cb
    sizes = {r: sum(1 for rr, _ in ca if rr == r) for r in range(1, 5)}
    assert len(set(sizes.values())) > 1 or 0 in sizes.values()

def test_adaptive_clipping_moves_the_bound(tmp_path):
    sets = ["run.rounds=4", 'strategy.name="dp_fedavg"', 'privacy.mechanism="dp-fedavg"',
            "privacy.noise_multiplier=0.5", "privacy.adaptive_clipping=true", "privacy.clip_norm=100.0",
            "privacy.count_noise=1.0", 'privacy.client_sampling="fixed"', "privacy.release_counters=false"]
    run_local(tiny(sets), tmp_path)
    bounds = [r["dp/clip_norm"] for r in read_jsonl(tmp_path / "metrics.jsonl")[1:]]
    assert bounds[-1] < bounds[0]  # every update is far below 100: the bound shrinks towards the median
    assert float(_ck(tmp_path)["strategy"]["clip_norm"]) < bounds[-1]

def test_noise_is_seeded(tmp_path):
    sets = ["run.rounds=2", 'strategy.name="dp_fedavg"', 'privacy.mechanism="dp-fedavg"',
            "privacy.noise_multiplier=1.0", "privacy.release_counters=false"]
    a = run_local(tiny(sets), tmp_path / "a")["final"]["test_loss"]
    b = run_local(tiny(sets), tmp_path / "b")["final"]["test_loss"]
    c = run_local(tiny([*sets, "run.seed=9"]), tmp_path / "c")["final"]["test_loss"]
    assert a == b and a != c
