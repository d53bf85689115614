"""Shared fixtures: a tiny scenario that runs in well under a second on the local engine."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

TINY = {
    "run": {"name": "tiny", "seed": 3, "rounds": 2, "progress": False, "checkpoint_every": 1},
    "data": {"dataset": "digits", "num_clients": 4, "partitioner": "iid", "test_fraction": 0.2},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1, "max_steps": 5},
    "strategy": {"name": "fedavg", "min_train_clients": 2},
}


def tiny(overrides: list[str] | None = None, **sections):
    """A validated tiny scenario; ``sections`` replace whole tables, ``overrides`` are --set items."""
    import copy

    from fedsim.catalog import resolve
    from fedsim.config import scenario_from_dict

    raw = copy.deepcopy(TINY)
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return resolve(scenario_from_dict(raw, overrides))


@pytest.fixture
def tiny_scenario():
    return tiny


def pytest_collection_modifyitems(config, items):
    """Run the slow end-to-end tests (deployments, Ray, audits) first.

    With several xdist workers the queue is then longest-first: the minutes-long tests start at
    once on every worker and the many sub-second tests fill the gaps at the end, instead of one
    worker finishing a deployment file alone while the other is idle. The sort is stable, so the
    order within each group is the collection order (the same on every worker, as xdist needs).
    Under ``--dist loadfile`` this needs ``--no-loadscope-reorder`` (``make test`` passes it): by
    default xdist hands out the files with the most tests first, whatever their order here.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
