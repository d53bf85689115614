"""Checks across the sections of a scenario (``fedsim.config.Scenario``'s last validator): crashes that would
never happen, rounds that need more clients than exist, and settings whose section makes them have no effect.

Each raises :class:`~fedsim.errors.ConfigError` naming the key; a setting that is accepted must have its effect.
This module imports nothing from :mod:`fedsim.config` (the schema calls it with its ``Scenario``).
"""

from __future__ import annotations

from typing import Any

from fedsim.errors import ConfigError

#: ``faults.straggler_slowdown``'s default (a changed value needs ``faults.stragglers > 0`` to matter)
DEFAULT_STRAGGLER_SLOWDOWN = 5.0


def check_sections_agree(scenario: Any) -> Any:
    """All the cross-section checks below, in order; returns ``scenario``."""
    return check_settings_have_effect(check_min_train_clients(check_crash_faults(scenario)))


def check_crash_faults(scenario: Any) -> Any:
    """``faults.crash_clients`` must name clients that exist (``0..data.num_clients-1``) and
    ``faults.crash_rounds`` rounds that run (``1..run.rounds``); rounds without clients would do nothing."""
    f, n, rounds = scenario.faults, scenario.data.num_clients, scenario.run.rounds
    ghosts = sorted({c for c in f.crash_clients if not 0 <= c < n})
    if ghosts:
        raise ConfigError("faults.crash_clients", f"client id(s) {ghosts} do not exist: data.num_clients = {n} "
                          f"gives ids 0..{n - 1}, so these crashes would never happen",
                          f"use ids in 0..{n - 1} or raise data.num_clients")
    never = sorted({r for r in f.crash_rounds if not 1 <= r <= rounds})
    if never:
        raise ConfigError("faults.crash_rounds", f"round(s) {never} are outside 1..{rounds} (run.rounds = {rounds}), "
                          "so these crashes would never happen", f"use rounds in 1..{rounds} or raise run.rounds")
    if f.crash_rounds and not f.crash_clients:
        raise ConfigError("faults.crash_rounds", "set without faults.crash_clients, so nothing would crash",
                          "name the crashing clients in faults.crash_clients or remove faults.crash_rounds")
    return scenario


def check_min_train_clients(scenario: Any) -> Any:
    """A round cannot need more clients (``strategy.min_train_clients``) than exist (``data.num_clients``)."""
    need, n = scenario.strategy.min_train_clients, scenario.data.num_clients
    if need > n:
        raise ConfigError("strategy.min_train_clients", f"{need} clients needed per round but the federation has "
                          f"{n} (data.num_clients)", f"lower strategy.min_train_clients to at most {n} "
                          "or raise data.num_clients")
    return scenario


def check_settings_have_effect(scenario: Any) -> Any:
    """A setting another key of the scenario makes inert is refused: ``client.momentum`` with the Adam optimisers
    (their first moment is ``betas[0]``, not fedsim's momentum), ``faults.straggler_slowdown`` without stragglers."""
    c, f = scenario.client, scenario.faults
    if c.momentum and c.optimizer != "sgd":
        raise ConfigError("client.momentum", f"is {c.momentum:g} but client.optimizer = \"{c.optimizer}\" never reads "
                          "it (Adam's first-moment decay is its own beta1), so it would have no effect",
                          "remove client.momentum, or use client.optimizer = \"sgd\"")
    if f.straggler_slowdown != DEFAULT_STRAGGLER_SLOWDOWN and not f.stragglers:
        raise ConfigError("faults.straggler_slowdown", f"is {f.straggler_slowdown:g} but faults.stragglers = 0, so no "
                          "client is ever slowed and it would have no effect",
                          "set faults.stragglers (the probability a client is slow in a round) or remove "
                          "faults.straggler_slowdown")
    return scenario
