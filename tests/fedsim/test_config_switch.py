"""Switching the strategy or the partitioner by an override drops the old name's options (and only those),
so bench/compare_fedld.py's study is one `fedsim sweep` grid."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from fedsim.api import load_scenario
from fedsim.config import apply_overrides, scenario_from_dict
from fedsim.config_switch import drop_switched_options
from fedsim.errors import ConfigError
from fedsim.experiments import parse_grid, plan_sweep

ROOT = Path(__file__).resolve().parents[2]
FEDLD = ROOT / "scenarios" / "fedld_noniid.toml"


def test_a_switched_strategy_sheds_its_options_and_keeps_the_common_keys():
    s = load_scenario(FEDLD, ['strategy.name="fedavg"', "strategy.min_train_clients=3"])
    assert s.strategy.name == "fedavg" and s.strategy.options() == {}
    assert s.strategy.min_train_clients == 3


def test_the_same_name_keeps_every_option():
    s = load_scenario(FEDLD, ['strategy.name="fedld"', 'strategy.guard="alignment"'])
    assert s.strategy.options() == {"kappa": 0.8, "lam": 0.03, "guard": "alignment"}


def test_an_old_option_set_again_by_an_override_is_kept_and_then_refused_by_the_new_strategy():
    with pytest.raises(ConfigError) as err:
        load_scenario(FEDLD, ['strategy.name="fedavg"', "strategy.kappa=0.8"])
    assert err.value.key == "strategy.kappa"


def test_a_switched_partitioner_sheds_the_old_partition_table_only():
    s = load_scenario(FEDLD, ['data.partitioner="iid"'])
    assert s.data.partitioner == "iid" and s.data.partition == {}
    s = load_scenario(FEDLD, ['data.partitioner="shard"', "data.partition.num_shards_per_partition=2"])
    assert s.data.partition == {"num_shards_per_partition": 2}


def test_the_dropped_keys_are_reported_and_nothing_changes_without_a_switch():
    raw = {"strategy": {"name": "fedld", "kappa": 0.8, "fraction_train": 0.5}, "data": {"partitioner": "iid"}}
    out = apply_overrides(raw, ['strategy.name="fedavg"'])
    assert out["strategy"] == {"name": "fedavg", "fraction_train": 0.5}
    same = copy.deepcopy(raw)
    assert drop_switched_options(raw, same, set()) == [] and same == raw


def _compare_fedld_scenarios(clients: int, rounds: int, min_alignment: float) -> dict:
    """The scenarios bench/compare_fedld.py runs (its own code), by (split, variant)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import compare_fedld as bench
        from _compare import load
    finally:
        sys.path.pop(0)
    base = load("fedld_noniid.toml")
    base["data"]["num_clients"], base["run"]["rounds"] = clients, rounds
    out = {}
    for split in ("0.1", "0.5", "iid"):
        for name, scen in bench.variants(bench.with_split(base, split), min_alignment).items():
            out[split, name] = scen
    return out


def test_compare_fedld_is_one_sweep_grid(tmp_path):
    """Every (split, variant) of bench/compare_fedld.py is a setting of this grid, scenario for scenario."""
    grid = parse_grid([
        'data={partitioner="dirichlet",partition={alpha=0.1}},{partitioner="dirichlet",partition={alpha=0.5}},'
        '{partitioner="iid"}',
        'strategy={name="fedld"},{name="fedld",guard="alignment",min_alignment=0.5},{name="fedavg"}',
    ])
    plan = plan_sweep(str(FEDLD), grid, [0], ["data.num_clients=12", "run.rounds=30"], tmp_path)
    assert len(plan) == 9
    expected = _compare_fedld_scenarios(12, 30, 0.5)
    variant = {"fedld": "paper", "alignment": "guard", "fedavg": "fedavg"}
    for run in plan:
        s = dict(run.setting)
        split = "iid" if s["data.partitioner"] == "iid" else str(s["data.partition.alpha"])
        key = variant["alignment" if "strategy.guard" in s else s["strategy.name"]]
        want = scenario_from_dict(expected[split, key]).to_dict()
        got = run.scenario.to_dict()
        assert got == want, (split, key)
