"""Every registered strategy and plugin runs on a tiny scenario (a new one is tested the day it lands)."""

import numpy as np
import pytest

from fedsim.catalog import registries
from fedsim.engines.local import run_local
from fedsim.results import read_jsonl
from tests.conftest import tiny

REG = registries()


@pytest.mark.parametrize("name", REG["strategies"].names())
def test_every_strategy_runs(name, tmp_path):
    cls = REG["strategies"].get(name)
    extra = list(getattr(cls, "tiny_overrides", ()))
    s = tiny([f'strategy.name="{name}"', "data.num_clients=6", "strategy.min_train_clients=6", *extra])
    summary = run_local(s, tmp_path)
    assert summary["status"] == "completed"
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert np.isfinite(rows[-1]["test_loss"])
    ok = [c for c in read_jsonl(tmp_path / "clients.jsonl") if c["status"] == "ok"]
    assert ok, "no client reply was accepted"


@pytest.mark.parametrize("name", REG["plugins"].names())
def test_every_plugin_runs_and_has_a_neutral_setting(name, tmp_path):
    cls = REG["plugins"].get(name)
    neutral = cls.Settings.neutral()
    assert isinstance(neutral, cls.Settings)
    s = tiny([f'client.plugins=["{name}"]', *getattr(cls, "tiny_overrides", ())])
    summary = run_local(s, tmp_path)
    assert summary["status"] == "completed"
    assert np.isfinite(read_jsonl(tmp_path / "metrics.jsonl")[-1]["test_loss"])


def test_registries_are_not_empty():
    for kind in ("strategies", "plugins", "partitioners", "datasets", "models"):
        assert REG[kind].names(), kind
    for required in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmed_mean", "krum"):
        assert required in REG["strategies"]
