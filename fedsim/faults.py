"""The fault model of a scenario's ``[faults]`` section, in one place.

Every fault is a seeded function of (root seed, round, client), so it is the same on every engine
and whatever the order of replies:

* crashes (``crash_clients`` / ``crash_rounds`` / ``crash_mode``) and dropouts (``dropout``) stop a
  client before it works (:func:`inject_failure`);
* stragglers (``stragglers`` / ``straggler_slowdown``) stretch its simulated compute time
  (:func:`simulated_time`);
* Byzantine clients (``byzantine_clients`` / ``attack`` / ``attack_strength``) are of three kinds:

  - client-side corruption of what a client sends (:data:`CLIENT_ATTACKS`): a model
    (:func:`attack_weights`) or a gradient (:func:`attack_gradient`);
  - data poisoning (``label_flip``): the client trains on labels ``y -> C - 1 - y``
    (:func:`flip_labels`; training messages only, evaluation replies stay honest);
  - omniscient colluding attacks (:data:`OMNISCIENT_ATTACKS`): the adversary sees the round's honest
    updates, so the server applies them right after the replies are validated and before
    aggregation (:func:`apply_omniscient_attack`, called by the strategy template); every Byzantine
    client of the round sends the same malicious update, computed from the honest ones.

:func:`check_attack` refuses, before the run, an attack a strategy cannot express. The schema
accepts no attack outside :data:`ATTACKS`.

References: ALIE — Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses for
Distributed Learning", NeurIPS 2019; IPM — Xie, Koyejo, Gupta, "Fall of Empires: Breaking
Byzantine-tolerant SGD by Inner Product Manipulation", UAI 2019; min-max / min-sum — Shejwalkar,
Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for
Federated Learning", NDSS 2021.
"""

from __future__ import annotations

import dataclasses
import os
from statistics import NormalDist
from typing import Any

import numpy as np

from fedsim.errors import ClientFailure, ConfigError
from fedsim.rng import numpy_rng

#: the client corrupts the model or gradient it sends
CLIENT_ATTACKS = ("sign_flip", "gaussian", "nan")
#: the client poisons its own training data
DATA_ATTACKS = ("label_flip",)
#: colluding attacks computed from the round's honest updates (applied on the server side)
OMNISCIENT_ATTACKS = ("alie", "ipm", "min_max", "min_sum")
#: implemented Byzantine attacks (``faults.attack``), besides ``"none"``
ATTACKS = CLIENT_ATTACKS + DATA_ATTACKS + OMNISCIENT_ATTACKS
#: ``faults.attack_strength`` default of the attacks that have a strength: IPM's ε (Xie et al. use
#: ε = 0.1 against median and Krum), the Gaussian attack's σ
DEFAULT_STRENGTH = {"ipm": 0.1, "gaussian": 1.0}


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


def attack_strength(scenario) -> float:
    """``faults.attack_strength``, or the attack's default (:data:`DEFAULT_STRENGTH`)."""
    f = scenario.faults
    return float(f.attack_strength) if f.attack_strength is not None else DEFAULT_STRENGTH.get(f.attack, 0.0)


def _attack_rng(scenario, server_round: int, partition_id: int) -> np.random.Generator:
    return numpy_rng(scenario.run.seed, "attack", server_round, partition_id)


# ------------------------------------------------------------------------------ client side
def attack_weights(scenario, server_round: int, partition_id: int, weights: dict[str, np.ndarray],
                   received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Byzantine client's model: sign_flip sends ``g − (w − g)``, gaussian ``g + N(0, σ²)``, nan NaN
    (``g`` the received global model); integer buffers pass unchanged. Honest clients, and the
    attacks that are not client-side corruptions, pass through."""
    attack = scenario.faults.attack
    if not is_byzantine(scenario, partition_id) or attack not in CLIENT_ATTACKS:
        return weights
    rng = _attack_rng(scenario, server_round, partition_id)
    sigma = attack_strength(scenario)
    out = {}
    for k, w in weights.items():
        g = received[k]
        if np.issubdtype(w.dtype, np.floating):
            if attack == "sign_flip":
                w = g - (w - g)
            elif attack == "gaussian":
                w = g + rng.normal(0.0, sigma, size=w.shape).astype(w.dtype)
            elif attack == "nan":
                w = np.full_like(w, np.nan)
        out[k] = np.asarray(w)
    return out


def attack_gradient(scenario, server_round: int, partition_id: int, g: np.ndarray) -> np.ndarray:
    """A Byzantine client's gradient: sign_flip ``−g``, gaussian ``g + σ·N(0, 1)``, nan NaN; other
    attacks (label flipping acts on the data, omniscient ones on the server) pass through."""
    attack = scenario.faults.attack
    if not is_byzantine(scenario, partition_id) or attack not in CLIENT_ATTACKS:
        return g
    if attack == "sign_flip":
        return -g
    if attack == "gaussian":
        noise = _attack_rng(scenario, server_round, partition_id).standard_normal(g.shape)
        return g + attack_strength(scenario) * noise
    return np.full_like(g, np.nan)


def flip_labels(scenario, partition_id: int, y: Any, num_classes: int) -> Any:
    """Label flipping (data poisoning): a Byzantine client's labels become ``C − 1 − y``.

    Works on NumPy arrays and torch tensors alike and never changes ``y`` in place."""
    if scenario.faults.attack != "label_flip" or not is_byzantine(scenario, partition_id):
        return y
    return (num_classes - 1) - y


# ------------------------------------------------------------------------------ omniscient math
def alie_z(n: int, f: int) -> float:
    """ALIE's ``z_max`` (Baruch et al. 2019, Algorithm 3): ``s = ⌊n/2 + 1⌋ − f`` supporters are needed,
    ``z_max = max z`` with ``Φ(z) < (n − s)/n``, i.e. ``Φ⁻¹((n − s)/n)``.

    When the Byzantine clients are a majority (``s < 1``) the formula's ``z`` is infinite; ``s = 1``,
    the largest finite value, is used. ``z ≥ 0`` for ``f ≥ 1``."""
    s = max(n // 2 + 1 - f, 1)
    return NormalDist().inv_cdf(max((n - s) / n, 0.5))


def alie(honest: np.ndarray, n: int, f: int) -> tuple[np.ndarray, float]:
    """ALIE: ``μ − z_max·σ`` per coordinate, ``μ``, ``σ`` the mean and (population) standard deviation
    of the honest updates (rows of ``honest``); returns the update and ``z_max``."""
    z = alie_z(n, f)
    return honest.mean(axis=0) - z * honest.std(axis=0), z


def ipm(honest: np.ndarray, eps: float) -> np.ndarray:
    """Inner product manipulation (Xie et al. 2019): ``−ε · mean`` of the honest updates."""
    return -eps * honest.mean(axis=0)


def _gamma_terms(honest: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """``‖μ + γp − x_i‖² = a_i + 2γ b_i + γ² c``: returns ``a, b, c`` and the pairwise squared distances."""
    mu = honest.mean(axis=0)
    diff = mu[None, :] - honest
    sq = np.sum(honest**2, axis=1)
    pair = np.maximum(sq[:, None] + sq[None, :] - 2.0 * honest @ honest.T, 0.0)
    return np.sum(diff**2, axis=1), diff @ p, float(p @ p), pair


def min_max(honest: np.ndarray) -> tuple[np.ndarray, float]:
    """Min-Max (Shejwalkar & Houmansadr 2021): ``μ + γ·p`` with ``p = −σ`` (the inverse standard
    deviation) and the largest ``γ`` such that ``max_i ‖μ + γp − x_i‖ ≤ max_{i,j} ‖x_i − x_j‖``.

    The paper finds ``γ`` by a halving search; the constraint is quadratic in ``γ`` and holds at
    ``γ = 0`` (the mean lies in the honest updates' hull), so the largest ``γ`` (the search's limit)
    is computed exactly. Returns the update and ``γ``."""
    p = -honest.std(axis=0)
    a, b, c, pair = _gamma_terms(honest, p)
    if c == 0.0:
        return honest.mean(axis=0), 0.0
    bound = float(pair.max())
    gamma = float(np.min((-b + np.sqrt(np.maximum(b * b - c * (a - bound), 0.0))) / c))
    return honest.mean(axis=0) + gamma * p, max(gamma, 0.0)


def min_sum(honest: np.ndarray) -> tuple[np.ndarray, float]:
    """Min-Sum (Shejwalkar & Houmansadr 2021): ``μ + γ·p``, ``p = −σ``, with the largest ``γ`` such
    that ``Σ_i ‖μ + γp − x_i‖² ≤ max_i Σ_j ‖x_i − x_j‖²``. As ``Σ_i (μ − x_i) = 0`` the constraint is
    ``Σ a_i + m γ² c ≤ bound``, solved exactly. Returns the update and ``γ``."""
    p = -honest.std(axis=0)
    a, _, c, pair = _gamma_terms(honest, p)
    if c == 0.0:
        return honest.mean(axis=0), 0.0
    slack = max(float(pair.sum(axis=1).max()) - float(a.sum()), 0.0)
    gamma = float(np.sqrt(slack / (len(honest) * c)))
    return honest.mean(axis=0) + gamma * p, gamma


def omniscient_update(attack: str, honest: np.ndarray, n: int, f: int,
                      strength: float) -> tuple[np.ndarray, float]:
    """The malicious update of ``attack`` from the honest updates (rows), ``n`` updates in the round,
    ``f`` of them Byzantine; returns it and the attack's scale (``z``, ``ε`` or ``γ``)."""
    if attack == "alie":
        return alie(honest, n, f)
    if attack == "ipm":
        return ipm(honest, strength), strength
    if attack == "min_max":
        return min_max(honest)
    if attack == "min_sum":
        return min_sum(honest)
    raise ValueError(f"'{attack}' is not an omniscient attack ({', '.join(OMNISCIENT_ATTACKS)})")


# ------------------------------------------------------------------------------ server side
def attack_space(strategy_cls: type) -> str | None:
    """What a strategy's validated replies hold, as far as attacks go: ``"model"`` (the model a plain
    ``train`` round returns: the update is ``w − global``), ``"vector"`` (medianSGD's noisy gradient:
    the update is the vector itself), ``"sign"`` (signSGD's packed 1-bit signs) or ``None`` (a client
    protocol of its own that does not model Byzantine clients: SemiFL, coded gradients)."""
    action = getattr(strategy_cls, "train_action", "")
    if action == "train":
        return "model"
    if action == "train.noisy_gradient":
        return "vector" if getattr(strategy_cls, "mode", "") == "median" else "sign"
    return None


def apply_omniscient_attack(strategy: Any, server_round: int, updates: list) -> list:
    """Replace the Byzantine clients' validated updates by the round's omniscient attack.

    ``updates`` are :class:`~fedsim.strategies.base.ClientUpdate` s sorted by partition id. The honest
    updates ``Δ_i`` (``w_i − global`` on floating-point tensors for model replies, the vector itself
    for medianSGD) are flattened into one vector each; every Byzantine client gets
    ``global + Δ_attack`` on floating-point tensors and keeps its own integer buffers. With no honest
    reply in the round, the colluders use their own benign updates. The attack's scale is added to
    the Byzantine clients' metrics as ``attack-scale``. Other attacks pass ``updates`` through."""
    scenario = strategy.scenario
    attack = scenario.faults.attack
    if attack not in OMNISCIENT_ATTACKS:
        return updates
    bad = [u for u in updates if is_byzantine(scenario, u.partition_id)]
    if not bad:
        return updates
    space = attack_space(type(strategy))
    if space not in ("model", "vector"):
        raise ConfigError("faults.attack", f"attack '{attack}' cannot be expressed on strategy "
                          f"'{strategy.name}' replies ({space or 'own client protocol'})",
                          "call fedsim.faults.check_attack before the run; choose another attack or strategy")
    honest = [u for u in updates if not is_byzantine(scenario, u.partition_id)] or bad
    base = strategy.current if space == "model" else [np.zeros_like(a) for a in bad[0].arrays]
    floats = [i for i, b in enumerate(base) if np.issubdtype(b.dtype, np.floating)]
    rows = np.stack([np.concatenate([(np.asarray(u.arrays[i], np.float64) - base[i]).ravel() for i in floats])
                     for u in honest])
    vec, scale = omniscient_update(attack, rows, len(updates), len(bad), attack_strength(scenario))
    made: dict[int, np.ndarray] = {}
    at = 0
    for i in floats:
        size = base[i].size
        made[i] = (np.asarray(base[i], np.float64) + vec[at:at + size].reshape(base[i].shape))
        at += size
    out = []
    for u in updates:
        if is_byzantine(scenario, u.partition_id):
            arrays = [made[i].astype(a.dtype) if i in made else a for i, a in enumerate(u.arrays)]
            u = dataclasses.replace(u, arrays=arrays, metrics={**u.metrics, "attack-scale": float(scale)})
        out.append(u)
    return out


# ------------------------------------------------------------------------------ preflight
def check_attack(scenario, strategy_cls: type) -> None:
    """Refuse, before the run, a ``[faults]`` Byzantine setting that would not do what it says.

    Byzantine clients without an attack, an attack without Byzantine clients, client ids outside
    ``0..num_clients−1`` or listed twice, and attacks the strategy cannot express (any attack on
    SemiFL or coded gradients, whose client protocols do not model Byzantine clients; omniscient
    attacks on signSGD's 1-bit signs, which carry no magnitude for ``σ``, ``ε`` or ``γ``) raise a
    :class:`~fedsim.errors.ConfigError` naming the key."""
    f = scenario.faults
    ids = list(f.byzantine_clients)
    if ids and f.attack == "none":
        raise ConfigError("faults.byzantine_clients", f"clients {ids} are Byzantine but faults.attack = \"none\": "
                          "they would behave honestly", f"set faults.attack to one of {', '.join(ATTACKS)}, "
                          "or empty faults.byzantine_clients")
    if f.attack == "none":
        return
    if not ids:
        raise ConfigError("faults.attack", f"attack '{f.attack}' but faults.byzantine_clients is empty: "
                          "no client would attack", "list the attacking clients in faults.byzantine_clients")
    n = scenario.data.num_clients
    out = sorted({i for i in ids if not 0 <= i < n})
    if out:
        raise ConfigError("faults.byzantine_clients", f"client ids {out} are outside 0..{n - 1} "
                          f"(data.num_clients = {n})", "use partition ids below data.num_clients")
    if len(set(ids)) != len(ids):
        raise ConfigError("faults.byzantine_clients", f"a client is listed twice in {ids}", "list each client once")
    space = attack_space(strategy_cls)
    name = getattr(strategy_cls, "name", strategy_cls.__name__)
    if space is None:
        raise ConfigError("faults.attack", f"strategy '{name}' has a client protocol of its own that does not "
                          f"model Byzantine clients, so attack '{f.attack}' would not run",
                          "use a strategy whose clients run the plain train task (e.g. fedavg, fedmedian, krum) "
                          "or set faults.attack = \"none\"")
    if space == "sign" and f.attack in OMNISCIENT_ATTACKS:
        raise ConfigError("faults.attack", f"the omniscient attack '{f.attack}' is defined on real-valued updates; "
                          f"strategy '{name}' receives 1-bit signs, which carry no magnitude for it",
                          f"use {', '.join(CLIENT_ATTACKS + DATA_ATTACKS)} with {name}, or strategy mediansgd")
