"""FedLD wired into Flower: the first round is the unweighted mean; later rounds use principal directions."""

import numpy as np
import pytest

from fedsim.engines.local import run_local
from fedsim.results import load_checkpoint
from tests.conftest import tiny


def _final_model(path):
    return load_checkpoint(sorted((path / "checkpoints").glob("round_*.npz"))[-1])


def test_first_round_equals_unweighted_fedavg(tmp_path):
    base = ["run.rounds=1", "data.partitioner=\"dirichlet\"", "data.partition.alpha=0.5",
            "data.partition.min_partition_size=5"]
    run_local(tiny([*base, 'strategy.name="fedld"', "strategy.lam=0.0"]), tmp_path / "ld")
    run_local(tiny([*base, 'strategy.name="fedavg"', "strategy.weighted=false"]), tmp_path / "avg")
    for a, b in zip(_final_model(tmp_path / "ld")["model"], _final_model(tmp_path / "avg")["model"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_later_rounds_differ_from_fedavg_and_state_is_checkpointed(tmp_path):
    base = ["run.rounds=3", "data.partitioner=\"dirichlet\"", "data.partition.alpha=0.3",
            "data.partition.min_partition_size=5"]
    run_local(tiny([*base, 'strategy.name="fedld"', "strategy.lam=0.0"]), tmp_path / "ld")
    run_local(tiny([*base, 'strategy.name="fedavg"', "strategy.weighted=false"]), tmp_path / "avg")
    ld, avg = _final_model(tmp_path / "ld"), _final_model(tmp_path / "avg")
    assert any(not np.allclose(a, b) for a, b in zip(ld["model"], avg["model"]))
    assert ld["strategy"]["seen"].all()


def test_margin_plugin_is_enabled_and_lambda_sent(tmp_path):
    from fedsim.clients.plugins.fedld_margin import FedLDMargin

    assert "fedld_margin" in __import__("fedsim.strategies.fedld", fromlist=["FedLD"]).FedLD.client_plugins
    s = tiny(['strategy.name="fedld"', "strategy.lam=0.5"])
    out = run_local(s, tmp_path)
    assert out["status"] == "completed"
    assert FedLDMargin.Settings.neutral().lam == 0.0


def test_bad_kappa_is_a_config_error():
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="kappa"):
        tiny(['strategy.name="fedld"', "strategy.kappa=1.5"])
