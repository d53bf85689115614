"""The fault model of a scenario's ``[faults]`` section, in one place.

Every fault is a seeded function of (root seed, round, client), so it is the same on every engine
and whatever the order of replies:

* crashes (``crash_clients`` / ``crash_rounds`` / ``crash_mode``) and dropouts (``dropout``) stop a
  client before it works (:func:`inject_failure`);
* stragglers (``stragglers`` / ``straggler_slowdown``) stretch its simulated compute time
  (:func:`simulated_time`);
* Byzantine clients (``byzantine_clients`` / ``attack``) corrupt what they send: a model
  (:func:`attack_weights`) or a gradient (:func:`attack_gradient`). :data:`ATTACKS` lists the attacks
  that are implemented; the schema accepts no other.
"""

from __future__ import annotations

import os

import numpy as np

from fedsim.errors import ClientFailure
from fedsim.rng import numpy_rng

#: implemented Byzantine attacks (``faults.attack``), besides ``"none"``
ATTACKS = ("sign_flip", "gaussian", "nan")


class ClientDropout(ClientFailure):
    """Injected by the fault model: the client left the round (simulated dropout)."""


class InjectedCrash(ClientFailure):
    """Injected by the fault model: the ClientApp raises (``faults.crash_clients``)."""


def inject_failure(scenario, server_round: int, partition_id: int) -> None:
    """Raise (or die) if the fault model makes this client crash or drop out of this round."""
    f = scenario.faults
    if partition_id in f.crash_clients and (not f.crash_rounds or server_round in f.crash_rounds):
        if f.crash_mode == "exit":
            if scenario.run.engine == "deploy":
                os._exit(1)  # the ClientApp process dies as if killed: no reply, no traceback
            if scenario.run.engine == "local":
                raise SystemExit(1)  # the local grid treats the node as dead
        raise InjectedCrash(f"client {partition_id}: injected crash in round {server_round}")
    if f.dropout > 0 and numpy_rng(scenario.run.seed, "dropout", server_round, partition_id).random() < f.dropout:
        raise ClientDropout(f"client {partition_id}: dropped out of round {server_round}")


def simulated_time(scenario, server_round: int, partition_id: int, steps: int) -> float:
    """Simulated compute time: one unit per local step, times the slowdown for a straggler."""
    f = scenario.faults
    slow = f.stragglers > 0 and numpy_rng(scenario.run.seed, "straggler", server_round,
                                          partition_id).random() < f.stragglers
    return float(steps) * (f.straggler_slowdown if slow else 1.0)


def is_byzantine(scenario, partition_id: int) -> bool:
    f = scenario.faults
    return f.attack != "none" and partition_id in f.byzantine_clients


def _attack_rng(scenario, server_round: int, partition_id: int) -> np.random.Generator:
    return numpy_rng(scenario.run.seed, "attack", server_round, partition_id)


def attack_weights(scenario, server_round: int, partition_id: int, weights: dict[str, np.ndarray],
                   received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Byzantine client's model: sign_flip sends ``g − (w − g)``, gaussian ``g + N(0, 1)``, nan NaN
    (``g`` the received global model); integer buffers pass unchanged. Honest clients pass through."""
    if not is_byzantine(scenario, partition_id):
        return weights
    attack = scenario.faults.attack
    rng = _attack_rng(scenario, server_round, partition_id)
    out = {}
    for k, w in weights.items():
        g = received[k]
        if np.issubdtype(w.dtype, np.floating):
            if attack == "sign_flip":
                w = g - (w - g)
            elif attack == "gaussian":
                w = g + rng.normal(0.0, 1.0, size=w.shape).astype(w.dtype)
            elif attack == "nan":
                w = np.full_like(w, np.nan)
        out[k] = np.asarray(w)
    return out


def attack_gradient(scenario, server_round: int, partition_id: int, g: np.ndarray) -> np.ndarray:
    """A Byzantine client's gradient: sign_flip ``−g``, gaussian ``g + N(0, 1)``, nan NaN."""
    if not is_byzantine(scenario, partition_id):
        return g
    attack = scenario.faults.attack
    if attack == "sign_flip":
        return -g
    if attack == "gaussian":
        return g + _attack_rng(scenario, server_round, partition_id).standard_normal(g.shape)
    return np.full_like(g, np.nan)
