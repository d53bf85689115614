"""Every built-in scenario runs end to end (2 rounds each, so the suite stays short)."""

import numpy as np
import pytest

from fedsim.catalog import builtin_scenarios
from fedsim.config import load_scenario
from fedsim.engines.local import run_local
from fedsim.results import read_jsonl


@pytest.mark.slow
@pytest.mark.parametrize("path", builtin_scenarios(), ids=lambda p: p.stem)
def test_builtin_scenario_runs(path, tmp_path):
    s = load_scenario(path, ["run.rounds=2", "run.progress=false"])
    summary = run_local(s, tmp_path)
    assert summary["status"] == "completed", summary
    assert np.isfinite(read_jsonl(tmp_path / "metrics.jsonl")[-1]["test_loss"])
