"""Every registered plugin runs on the Ray engine (registry-driven, so a new plugin is covered the day
it lands). A Ray simulation costs seconds to start, so plugins that can share a scenario run together:
they are packed greedily into groups whose merged ``tiny_overrides`` agree and which the resolver
accepts (no two owners of the sampler, step or forward; every plugin's preflight passes). Each group
is one Ray run whose every client reply must be accepted and carry each plugin's work."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.catalog import registries
from fedsim.errors import ConfigError
from fedsim.results import read_jsonl
from tests.conftest import tiny
from tests.test_registry import ENABLED_BY

REG = registries()
#: at most this many plugins per Ray run (a failing group stays easy to read)
GROUP_SIZE = 6
BASE = ("run.rounds=2", "client.max_steps=3", "data.num_clients=4", "strategy.min_train_clients=4")


def _merge(items: list[str]) -> dict[str, str] | None:
    """``--set`` items by key; ``None`` when two items set one key differently."""
    out: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        if out.get(key.strip(), value) != value:
            return None
        out[key.strip()] = value
    return out


def _overrides(names: list[str]) -> list[str] | None:
    extra = []
    for n in names:
        extra += ENABLED_BY.get(n, []) + list(getattr(REG["plugins"].get(n), "tiny_overrides", ()))
    merged = _merge(extra)
    if merged is None:
        return None
    plain = [n for n in names if n not in ENABLED_BY]
    items = [f"{k}={v}" for k, v in merged.items()]
    if plain:
        items.append("client.plugins=[" + ", ".join(f'"{n}"' for n in plain) + "]")
    return [*BASE, *items]


def _accepted(names: list[str]) -> list[str] | None:
    items = _overrides(names)
    if items is None:
        return None
    try:
        tiny(items)
    except ConfigError:
        return None
    return items


def plugin_groups() -> list[tuple[list[str], list[str]]]:
    groups: list[list[str]] = []
    for name in REG["plugins"].names():
        for g in groups:
            if len(g) < GROUP_SIZE and _accepted([*g, name]) is not None:
                g.append(name)
                break
        else:
            groups.append([name])
    return [(g, _accepted(g) or _overrides(g)) for g in groups]


GROUPS = plugin_groups()
#: the registered plugins when this module was collected (before any test ran: tests that register a
#: user's plugin from Python add to the same registry in their worker process)
REGISTERED = sorted(REG["plugins"].names())


def test_every_plugin_is_in_exactly_one_group():
    names = [n for g, _ in GROUPS for n in g]
    assert sorted(names) == REGISTERED


@pytest.mark.slow
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: "+".join(g[0]))
def test_every_plugin_runs_on_ray(group, tmp_path):
    pytest.importorskip("ray")
    from fedsim.engines.ray import run_ray

    names, items = group
    s = tiny(items)
    summary = run_ray(s, tmp_path)
    assert summary["status"] == "completed", summary
    assert np.isfinite(read_jsonl(tmp_path / "metrics.jsonl")[-1]["test_loss"])
    replies = read_jsonl(tmp_path / "clients.jsonl")
    assert replies and all(c["status"] == "ok" for c in replies), [c for c in replies if c["status"] != "ok"][:2]
