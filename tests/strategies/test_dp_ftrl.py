"""DP-FTRL through the engine and its state: every client once per epoch, ε grows by epoch,
w0 and the noise tree survive a state round trip."""

import numpy as np

from fedsim.engines.local import run_local
from fedsim.results import read_jsonl
from tests.conftest import tiny


def test_dp_ftrl_visits_every_client_once_per_epoch(tmp_path):
    sets = ["run.rounds=4", 'strategy.name="dp_ftrl"', 'privacy.mechanism="dp-ftrl"',
            "privacy.noise_multiplier=1.0", "strategy.fraction_train=0.5", "privacy.release_counters=false"]
    run_local(tiny(sets), tmp_path)
    seen = [(c["round"], c["client"]) for c in read_jsonl(tmp_path / "clients.jsonl")]
    for epoch in ((1, 2), (3, 4)):
        clients = sorted(c for r, c in seen if r in epoch)
        assert clients == [0, 1, 2, 3]
    eps = [r["epsilon"] for r in read_jsonl(tmp_path / "privacy.jsonl") if r["mechanism"] == "dp-ftrl"]
    assert eps == sorted(eps)


def _updates(strategy, seed):
    from fedsim.strategies.base import ClientUpdate

    rng = np.random.default_rng(seed)
    return [ClientUpdate(p, p, [a + rng.normal(0, 0.1, a.shape).astype(a.dtype) if a.dtype.kind == "f" else a
                                for a in strategy.current], 10, {}, None) for p in range(2)]


def test_dp_ftrl_state_round_trip_continues_bit_identically():
    from fedsim.strategies.base import make_strategy
    from fedsim.wire import from_numpy
    from flwr.app import ArrayRecord

    sets = ['strategy.name="dp_ftrl"', 'privacy.mechanism="dp-ftrl"', "privacy.noise_multiplier=1.0",
            "strategy.fraction_train=0.5"]
    a = make_strategy(tiny(sets))
    rng = np.random.default_rng(0)
    arrays = ArrayRecord({"w": from_numpy(rng.normal(size=(3, 4)).astype(np.float32)),
                          "b": from_numpy(np.zeros(4, dtype=np.float32))})
    a.set_global(arrays)
    a.current = a.aggregate(1, _updates(a, 1))
    state = a.state_dict()
    assert any(k.startswith("w0.") for k in state) and "noise" in state  # w0 and the noise tree are state
    b = make_strategy(tiny(sets))
    b.load_state_dict({k: np.asarray(v) for k, v in state.items()})
    b.set_global(a.to_record(a.current))
    for x, y in zip(a.aggregate(2, _updates(a, 2)), b.aggregate(2, _updates(b, 2))):
        np.testing.assert_array_equal(x, y)


def test_dp_ftrl_owns_the_mechanism_the_ledger_composes():
    from fedsim.strategies.base import make_strategy

    s = make_strategy(tiny(['strategy.name="dp_ftrl"', 'privacy.mechanism="dp-ftrl"',
                            "privacy.noise_multiplier=0.7", "strategy.fraction_train=0.5"]))
    (m,) = s.privacy_mechanisms()
    assert m.noise_multiplier == s.noise.noise_multiplier == 0.7
    assert m.rounds_per_epoch == s.rounds_per_epoch
