"""The DP mechanisms a run's ledger composes: each reports its ε(δ), the ε(δ) its next round would
bring, and records what a round released.

One object per mechanism holds its parameters, sampling and accounting event together (pfl-research's
``GaussianMechanism.from_privacy_accountant`` is the anchor): a strategy that adds noise builds its
mechanism once and takes its noise multiplier, sampling rate and sample size from it, so what is
accounted is what was done. The ledger (``fedsim.privacy.ledger``) only composes.

* :class:`ClientLevelMechanism` — DP-FedAvg: one Poisson-subsampled (rate ``q``) or fixed-size (``m``
  of ``n``) Gaussian release per round, client-level.
* :class:`DPFTRLMechanism` — DP-FTRL: ρ-zCDP of the tree mechanism over epochs (``dp_ftrl_rho``).
* :class:`DPSGDMechanism` — a server-side mirror of every client's DP-SGD accountant (Poisson-subsampled
  Gaussian per local step, composed for the rounds the client took part in); ε is the worst client's.
* :class:`CounterMechanism` — a continual-release counter publishing a running count (a scalar: the
  participation count; a vector: the label histogram of the data that trained).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsim.privacy.accountants import FixedSizeGaussianEvent, PoissonGaussianEvent, make_accountant, zcdp_to_epsilon
from fedsim.privacy.dp_ftrl import dp_ftrl_rho


@dataclass
class RoundOutcome:
    """What a round did, as the ledger needs it: the valid updates' partition ids and metrics."""

    sampled: list[int]
    participants: list[int]
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)


class Mechanism(ABC):
    """Interface of a ledger entry."""

    name = ""

    @abstractmethod
    def epsilon(self, delta: float) -> float:
        """ε(δ) spent so far."""

    @abstractmethod
    def epsilon_next(self, rnd: int, delta: float) -> float:
        """ε(δ) once round ``rnd`` has run (the budget check before the round)."""

    def epsilon_after(self, rounds: int, delta: float) -> float:
        """ε(δ) once ``rounds`` more rounds have run, every client taking part in each (the plan's worst
        case; ``privacy.target_epsilon`` is calibrated against it). Mechanisms whose ε does not grow
        with rounds (the released counters) report :meth:`epsilon`."""
        return self.epsilon(delta)

    def with_noise_multiplier(self, noise_multiplier: float) -> "Mechanism":
        """A fresh copy (nothing composed yet) with another noise multiplier and the same plan."""
        raise NotImplementedError(f"{type(self).__name__} has no noise multiplier to calibrate")

    def check_reply(self, pid: int, metrics: dict[str, Any]) -> None:
        """Raise ``ClientUpdateError`` if a reply's mechanism parameters are not the accounted ones."""
        return None

    def record(self, rnd: int, outcome: RoundOutcome) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class ClientLevelMechanism(Mechanism):
    """DP-FedAvg's Gaussian release per round: noise ``z`` on the clipped sum, clients Poisson-sampled
    with rate ``rate`` or a fixed-size sample of ``sample_size`` of ``population`` clients."""

    name = "dp-fedavg"

    def __init__(self, noise_multiplier: float, sampling: str, rate: float, sample_size: int, population: int,
                 accountant: str = "rdp") -> None:
        self.noise_multiplier, self.sampling = float(noise_multiplier), sampling
        self.rate, self.sample_size, self.population = float(rate), int(sample_size), int(population)
        self.accountant = make_accountant(accountant)
        self.event = (PoissonGaussianEvent(self.noise_multiplier, self.rate) if sampling == "poisson"
                      else FixedSizeGaussianEvent(self.noise_multiplier, self.sample_size, self.population))

    def poisson_sample(self, rng: np.random.Generator) -> np.ndarray:
        """Which of the ``population`` clients a Poisson sample with the accounted rate takes."""
        return rng.random(self.population) < self.rate

    def epsilon(self, delta: float) -> float:
        return self.accountant.epsilon(delta)

    def epsilon_next(self, rnd: int, delta: float) -> float:
        return self.epsilon_after(1, delta)

    def epsilon_after(self, rounds: int, delta: float) -> float:
        return self.accountant.epsilon_if(self.event, int(rounds), delta)

    def with_noise_multiplier(self, noise_multiplier: float) -> "ClientLevelMechanism":
        return ClientLevelMechanism(noise_multiplier, self.sampling, self.rate, self.sample_size, self.population,
                                    self.accountant.name)

    def record(self, rnd: int, outcome: RoundOutcome) -> dict[str, Any]:
        self.accountant.compose(self.event, 1)
        return {"sampled": len(outcome.sampled), "noise_multiplier": self.noise_multiplier}

    def state_dict(self) -> dict[str, Any]:
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state)


class DPFTRLMechanism(Mechanism):
    """DP-FTRL's tree-aggregated release: every client once per epoch of ``rounds_per_epoch`` rounds."""

    name = "dp-ftrl"

    def __init__(self, noise_multiplier: float, rounds_per_epoch: int, restart_every_epochs: int = 0) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.rounds_per_epoch = int(rounds_per_epoch)
        self.restart = int(restart_every_epochs) or None
        self.rounds = 0

    def rho(self, rounds: int) -> float:
        """ρ-zCDP after ``rounds`` rounds: every client in every started epoch, once."""
        epochs = math.ceil(rounds / self.rounds_per_epoch)
        return dp_ftrl_rho(self.noise_multiplier, self.rounds_per_epoch, epochs, self.restart)

    def epsilon(self, delta: float) -> float:
        return zcdp_to_epsilon(self.rho(self.rounds), delta) if self.rounds else 0.0

    def epsilon_next(self, rnd: int, delta: float) -> float:
        return self.epsilon_after(1, delta)

    def epsilon_after(self, rounds: int, delta: float) -> float:
        return zcdp_to_epsilon(self.rho(self.rounds + int(rounds)), delta) if self.rounds + rounds else 0.0

    def with_noise_multiplier(self, noise_multiplier: float) -> "DPFTRLMechanism":
        return DPFTRLMechanism(noise_multiplier, self.rounds_per_epoch, self.restart or 0)

    def record(self, rnd: int, outcome: RoundOutcome) -> dict[str, Any]:
        self.rounds += 1
        return {"rho": self.rho(self.rounds), "noise_multiplier": self.noise_multiplier}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])


class DPSGDMechanism(Mechanism):
    """The server's account of every client's DP-SGD: the Poisson rate ``q_i`` and the number of
    private steps ``T_i`` each client must use are planned here from ``[privacy]`` and ``[client]``
    (the client derives the same from the same scenario); a reply whose reported parameters differ is
    rejected (:meth:`check_reply`) and the accountants compose the *planned* event for every accepted
    participant — never a figure the client reported. ε is the worst client's; the budget check
    assumes the worst client is sampled next round."""

    name = "dp-sgd"

    def __init__(self, scenario, sizes: np.ndarray) -> None:
        p, c = scenario.privacy, scenario.client
        self.z, self.clip, self.kind = float(p.noise_multiplier), float(p.clip_norm), p.accountant
        self.delta = float(p.delta)
        self.accountants = {i: make_accountant(self.kind) for i in range(len(sizes))}
        self.plan: dict[int, tuple[float, int]] = {}
        for i, n in enumerate(sizes):
            q = p.sample_rate or min(1.0, c.batch_size / max(int(n), 1))
            steps = c.epochs * max(1, round(1 / q))
            if c.max_steps:
                steps = min(steps, c.max_steps)
            self.plan[i] = (q, steps)

    def check_reply(self, pid: int, metrics: dict[str, Any]) -> None:
        """Raise ``ClientUpdateError`` unless the reply's DP-SGD parameters are the accounted ones."""
        from fedsim.errors import ClientUpdateError

        if pid not in self.plan:
            raise ClientUpdateError(pid, "partition-id", "not a client of this federation")
        q, steps = self.plan[pid]
        expected = {"dp_sgd/noise_multiplier": self.z, "dp_sgd/clip_norm": self.clip, "dp_sgd/sample_rate": q,
                    "dp_sgd/steps": float(steps), "dp_sgd/poisson": 1.0}
        for key, want in expected.items():
            got = metrics.get(key)
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                raise ClientUpdateError(pid, f"metrics.{key}", f"missing from a DP-SGD reply (got {got!r})",
                                        "the client must run the dp_sgd plugin with the [privacy] settings")
            if not math.isclose(float(got), want, rel_tol=1e-9, abs_tol=0.0):
                raise ClientUpdateError(pid, f"metrics.{key}", f"{got!r} differs from the accounted {want!r}; "
                                        "the reply is not aggregated", "clients must use the [privacy] settings "
                                        "and the scenario's local data size")

    def epsilon(self, delta: float) -> float:
        return max(a.epsilon(delta) for a in self.accountants.values())

    def epsilon_next(self, rnd: int, delta: float) -> float:
        return self.epsilon_after(1, delta)

    def epsilon_after(self, rounds: int, delta: float) -> float:
        """The worst client's ε(δ) if every client takes part in ``rounds`` more rounds."""
        return max(self.clients_after(rounds, delta).values())

    def clients_after(self, rounds: int, delta: float) -> dict[int, float]:
        """Each client's ε(δ) after ``rounds`` more rounds (clients with the same ledger and plan are
        computed once)."""
        seen: dict[tuple, float] = {}
        out = {}
        for i, a in self.accountants.items():
            key = (tuple(a.ledger), self.plan[i])
            if key not in seen:
                q, steps = self.plan[i]
                seen[key] = a.epsilon_if(PoissonGaussianEvent(self.z, q), steps * int(rounds), delta)
            out[i] = seen[key]
        return out

    def with_noise_multiplier(self, noise_multiplier: float) -> "DPSGDMechanism":
        fresh = copy.copy(self)
        fresh.z = float(noise_multiplier)
        fresh.accountants = {i: make_accountant(self.kind) for i in self.accountants}
        return fresh

    def narrowed(self, clients: list[int]) -> "DPSGDMechanism":
        """A copy that accounts only ``clients`` (a calibration's candidates for the worst client)."""
        part = copy.copy(self)
        part.accountants = {i: self.accountants[i] for i in sorted(set(clients))}
        return part

    def client_epsilons(self, delta: float) -> dict[int, float]:
        return {i: a.epsilon(delta) for i, a in self.accountants.items()}

    def record(self, rnd: int, outcome: RoundOutcome) -> dict[str, Any]:
        for pid in outcome.participants:
            q, steps = self.plan[pid]
            if steps:
                self.accountants[pid].compose(PoissonGaussianEvent(self.z, q), steps)
        eps = self.client_epsilons(self.delta)
        worst = max(eps, key=lambda i: (eps[i], -i))
        return {"participants": len(outcome.participants), "worst_client": worst, "noise_multiplier": self.z,
                "clients": {str(i): _finite(e) for i, e in eps.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {str(i): a.state_dict() for i, a in self.accountants.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            self.accountants[int(k)].load_state_dict(v)


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 1e300


class CounterMechanism(Mechanism):
    """A running count published through a continual-release counter (event-level ρ-zCDP).

    One client (or sample) changes one round's record by at most 1, but a round's record can be
    larger: the counter runs on a zero stream so that its noise process is used unclipped, and the
    exact running count is added to it. ``shape=()`` counts participants; ``shape=(classes,)`` sums
    the clients' label counts (ℓ2 sensitivity 1: one sample moves one bin by 1).
    """

    def __init__(self, name: str, kind: str, horizon: int, rho: float, rng: np.random.Generator,
                 shape: tuple[int, ...] = ()) -> None:
        from fedsim.privacy.counters import make_counter

        self.name, self.rho, self.shape = name, float(rho), tuple(shape)
        self.counter = make_counter(kind, horizon, self.rho, shape=self.shape, rng=rng)
        self.total = np.zeros(self.shape)
        self.released: float | list[float] | None = None

    def epsilon(self, delta: float) -> float:
        return zcdp_to_epsilon(self.rho, delta)

    def epsilon_next(self, rnd: int, delta: float) -> float:
        return self.epsilon(delta)

    def count(self, outcome: RoundOutcome) -> np.ndarray:
        if not self.shape:
            return np.asarray(float(len(outcome.participants)))
        out = np.zeros(self.shape)
        for pid in outcome.participants:
            counts = outcome.metrics.get(pid, {}).get("label-counts")
            if isinstance(counts, list) and len(counts) == self.shape[0]:
                out += np.asarray(counts, dtype=np.float64)
        return out

    def record(self, rnd: int, outcome: RoundOutcome) -> dict[str, Any]:
        self.total = self.total + self.count(outcome)
        noisy = self.total + np.asarray(self.counter.update(np.zeros(self.shape)))
        self.released = float(noisy) if not self.shape else [round(float(v), 3) for v in noisy]
        return {"released": self.released}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": int(self.counter.steps), "total": np.asarray(self.total).tolist(),
                "released": self.released, "counter": self.counter.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = np.asarray(state["total"], dtype=np.float64).reshape(self.shape)
        self.released = state.get("released")
        self.counter.load_state_dict(state["counter"])
