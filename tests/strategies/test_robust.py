"""Robust aggregators whose settings could silently do nothing.

Krum's bound (Blanchard et al., NeurIPS 2017: more than 2f + 2 updates): a scenario whose every round
would be refused is refused before the run; a round that falls below the bound at run time (clients
crashed) is a failed round — never a "completed" run that trained nothing. The trimmed mean (Yin et al.,
ICML 2018) drops floor(β·m) values per side: a β that trims nothing is refused before the run, and each
round reports how many it trimmed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.engines.local import run_local
from fedsim.errors import ConfigError, FailedRoundError
from fedsim.results import load_checkpoint, read_jsonl
from tests.conftest import tiny

KRUM = ['strategy.name="krum"', "strategy.num_malicious=1", "data.num_clients=6"]


@pytest.mark.parametrize("sampled", [2, 3, 4])
def test_krum_refuses_a_sample_it_could_never_aggregate(tmp_path, sampled):
    s = tiny([*KRUM, f"strategy.min_train_clients={sampled}", "strategy.fraction_train=0.1"])
    with pytest.raises(ConfigError, match="more than 2f \\+ 2 = 4") as err:
        run_local(s, tmp_path / "run")
    assert err.value.key == "strategy.num_malicious" and "at least 5 clients" in err.value.hint
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_multi_krum_refuses_more_picks_than_the_honest_updates(tmp_path):
    base = [*KRUM, "strategy.min_train_clients=6", "run.rounds=1"]
    with pytest.raises(ConfigError, match="include at least 1 of the 1 Byzantine") as err:
        run_local(tiny([*base, "strategy.num_selected=6"]), tmp_path / "a")
    assert err.value.key == "strategy.num_selected" and "<= 5" in err.value.hint
    assert run_local(tiny([*base, "strategy.num_selected=5"]), tmp_path / "b")["status"] == "completed"


def test_a_round_below_the_bound_fails_instead_of_passing_unchanged(tmp_path):
    every = [*KRUM, "data.num_clients=5", "strategy.min_train_clients=5"]  # all 5 sampled: 5 > 2f + 2
    assert run_local(tiny(every), tmp_path / "ok")["status"] == "completed"
    s = tiny([*every, "faults.crash_clients=[0]"])  # 4 valid replies
    with pytest.raises(FailedRoundError, match="krum refused to aggregate the 4 valid replies") as err:
        run_local(s, tmp_path / "stop")
    assert err.value.exit_code == 10
    summary = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert summary["status"] == "stopped: FailedRoundError" and summary["failed_rounds"] == [1]
    assert any(c["status"] == "aggregation" for c in read_jsonl(tmp_path / "stop" / "clients.jsonl"))


def test_continue_counts_the_refused_round_and_leaves_the_model(tmp_path):
    s = tiny([*KRUM, "data.num_clients=5", "strategy.min_train_clients=5", "faults.crash_clients=[0]",
              "faults.crash_rounds=[2]",
              "run.rounds=3", 'run.on_failed_round="continue"'])
    summary = run_local(s, tmp_path)
    assert summary["status"] == "completed" and summary["failed_rounds"] == [2]
    ckpt = [load_checkpoint(tmp_path / "checkpoints" / f"round_000{r}.npz")["model"] for r in (1, 2, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(ckpt[0], ckpt[1]))      # round 2 changed nothing
    assert any(not np.array_equal(a, b) for a, b in zip(ckpt[1], ckpt[2]))  # round 3 trained again


@pytest.mark.parametrize("beta, sampled", [(0.1, 6), (0.1, 9), (0.2, 4), (0.3, 3)])
def test_trimmed_mean_refuses_a_beta_that_trims_nothing(tmp_path, beta, sampled):
    s = tiny(['strategy.name="trimmed_mean"', f"strategy.beta={beta}", f"data.num_clients={sampled}",
              f"strategy.min_train_clients={sampled}"])
    with pytest.raises(ConfigError, match="= 0 values per side") as err:
        run_local(s, tmp_path / "run")
    assert err.value.key == "strategy.beta" and "1/m" in err.value.hint
    assert not (tmp_path / "run").exists()


def test_trimmed_mean_reports_what_it_trimmed_each_round(tmp_path):
    base = ['strategy.name="trimmed_mean"', "strategy.beta=0.2", "data.num_clients=5",
            "strategy.min_train_clients=5", "run.rounds=3"]
    run_local(tiny([*base, "faults.crash_clients=[0]", "faults.crash_rounds=[2]"]), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")[1:]
    # floor(0.2 · 5) = 1 per side; round 2 has 4 valid replies: floor(0.8) = 0, that round's mean is untrimmed
    assert [r["trimmed-per-side"] for r in rows] == [1, 0, 1]
    assert run_local(tiny([*base[:-1], "strategy.beta=0.0"]), tmp_path / "plain")["status"] == "completed"
