"""The run's privacy ledger: ε(δ) per round for every mechanism, and the budget check.

The server loop calls :meth:`PrivacyLedger.before_round` before any client is contacted (it raises
:class:`~fedsim.errors.PrivacyBudgetExceeded` when running the round could push any mechanism past
``privacy.max_epsilon``) and :meth:`PrivacyLedger.after_round` after aggregation (it composes what
the round actually released and returns the records written to ``privacy.jsonl``). Its state goes
into every checkpoint.

Mechanisms
----------
* ``dp-sgd`` — a server-side mirror of every client's accountant (Poisson-subsampled Gaussian per
  local step, composed only for rounds the client took part in). The budget check takes the worst
  client, assuming it is sampled next round. The ε each client reports itself must agree.
* ``dp-fedavg`` — client-level: one Poisson-subsampled (rate ``fraction_train``) or fixed-size
  Gaussian release per round.
* ``dp-ftrl`` — client-level ρ-zCDP of the tree mechanism (``dp_ftrl_rho``).
* ``counter/participation`` — the per-round number of participating clients, published through a
  continual-release counter (event-level ρ-zCDP; the noisy running count goes into the metrics as
  ``released/participation``).
* ``counter/label_histogram`` — the running label histogram of the data that trained (clients send
  their label counts with the update; they are never logged), published as ``released/label_histogram``.

The ``total`` record is the basic composition (sum) of the mechanisms' ε at the same δ — a safe upper
bound when mechanisms protect the same unit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsim.errors import PrivacyBudgetExceeded
from fedsim.privacy.accountants import FixedSizeGaussianEvent, PoissonGaussianEvent, make_accountant, zcdp_to_epsilon
from fedsim.rng import numpy_rng


class _Mechanism:
    name = ""

    def epsilon(self, delta: float) -> float:
        raise NotImplementedError

    def epsilon_next(self, rnd: int, delta: float) -> float:
        raise NotImplementedError

    def record(self, rnd: int, strategy: Any) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class DPSGDMechanism(_Mechanism):
    name = "dp-sgd"

    def __init__(self, scenario, sizes: np.ndarray) -> None:
        p, c = scenario.privacy, scenario.client
        self.z, self.kind = p.noise_multiplier, p.accountant
        self.accountants = {i: make_accountant(self.kind) for i in range(len(sizes))}
        self.plan: dict[int, tuple[float, int]] = {}
        for i, n in enumerate(sizes):
            q = p.sample_rate or min(1.0, c.batch_size / max(int(n), 1))
            steps = c.epochs * max(1, round(1 / q))
            if c.max_steps:
                steps = min(steps, c.max_steps)
            self.plan[i] = (q, steps)

    def epsilon(self, delta: float) -> float:
        return max(a.epsilon(delta) for a in self.accountants.values())

    def epsilon_next(self, rnd: int, delta: float) -> float:
        return max(a.epsilon_if(PoissonGaussianEvent(self.z, self.plan[i][0]), self.plan[i][1], delta)
                   for i, a in self.accountants.items())

    def record(self, rnd: int, strategy: Any) -> dict[str, Any]:
        for u in strategy.last_updates:
            steps = int(u.metrics.get("dp_sgd/steps", 0))
            q = float(u.metrics.get("dp_sgd/sample_rate", self.plan[u.partition_id][0]))
            if steps:
                self.accountants[u.partition_id].compose(PoissonGaussianEvent(self.z, q), steps)
        return {"participants": len(strategy.last_updates)}

    def client_epsilon(self, pid: int, delta: float) -> float:
        return self.accountants[pid].epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): a.state_dict() for i, a in self.accountants.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            self.accountants[int(k)].load_state_dict(v)


class ClientLevelMechanism(_Mechanism):
    name = "dp-fedavg"

    def __init__(self, scenario) -> None:
        p, s = scenario.privacy, scenario.strategy
        self.accountant = make_accountant(p.accountant)
        n = scenario.data.num_clients
        if p.client_sampling == "poisson":
            self.event = PoissonGaussianEvent(p.noise_multiplier, s.fraction_train)
        else:
            m = min(n, max(int(math.floor(s.fraction_train * n)), s.min_train_clients))
            self.event = FixedSizeGaussianEvent(p.noise_multiplier, m, n)

    def epsilon(self, delta: float) -> float:
        return self.accountant.epsilon(delta)

    def epsilon_next(self, rnd: int, delta: float) -> float:
        return self.accountant.epsilon_if(self.event, 1, delta)

    def record(self, rnd: int, strategy: Any) -> dict[str, Any]:
        self.accountant.compose(self.event, 1)
        return {"sampled": len(strategy.sampled)}

    def state_dict(self) -> dict[str, Any]:
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state)


class DPFTRLMechanism(_Mechanism):
    name = "dp-ftrl"

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.rounds = 0

    def epsilon(self, delta: float) -> float:
        return zcdp_to_epsilon(self.strategy.rho(self.rounds), delta) if self.rounds else 0.0

    def epsilon_next(self, rnd: int, delta: float) -> float:
        return zcdp_to_epsilon(self.strategy.rho(self.rounds + 1), delta)

    def record(self, rnd: int, strategy: Any) -> dict[str, Any]:
        self.rounds += 1
        return {"rho": self.strategy.rho(self.rounds)}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])


class ParticipationCounter(_Mechanism):
    """Publishes the running number of participating clients with a continual-release counter."""

    name = "counter/participation"

    def __init__(self, scenario) -> None:
        from fedsim.privacy.counters import make_counter

        p = scenario.privacy
        self.rho = 1.0 / (2.0 * p.counter_noise ** 2) * _levels(scenario.run.rounds, p.counter)
        rng = np.random.default_rng() if p.secure_rng else numpy_rng(scenario.run.seed, "noise", "counter")
        self.counter = make_counter(p.counter, scenario.run.rounds, self.rho, rng=rng)
        self.released: float | None = None
        self.count = 0

    def epsilon(self, delta: float) -> float:
        return zcdp_to_epsilon(self.rho, delta)

    def epsilon_next(self, rnd: int, delta: float) -> float:
        return self.epsilon(delta)

    def record(self, rnd: int, strategy: Any) -> dict[str, Any]:
        # One client changes one round's count by 1 (event-level sensitivity 1), but a round's count
        # is up to m: the counter runs on a zero stream so that its noise process is used unclipped,
        # and the exact running count is added to it.
        self.count += len(strategy.last_updates)
        self.released = self.count + float(self.counter.update(0.0))
        return {"released": self.released}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": int(self.counter.steps), "count": self.count}


class LabelHistogramCounter(_Mechanism):
    """Publishes the running label histogram of the data that trained (sample-level, one sample
    moves one bin by 1: ℓ2 sensitivity 1) with a vector continual-release counter."""

    name = "counter/label_histogram"

    def __init__(self, scenario, num_classes: int) -> None:
        from fedsim.privacy.counters import make_counter

        p = scenario.privacy
        self.rho = 1.0 / (2.0 * p.counter_noise ** 2) * _levels(scenario.run.rounds, p.counter)
        rng = np.random.default_rng() if p.secure_rng else numpy_rng(scenario.run.seed, "noise", "labels")
        self.counter = make_counter(p.counter, scenario.run.rounds, self.rho, shape=(num_classes,), rng=rng)
        self.total = np.zeros(num_classes)
        self.released: list[float] | None = None

    def epsilon(self, delta: float) -> float:
        return zcdp_to_epsilon(self.rho, delta)

    def epsilon_next(self, rnd: int, delta: float) -> float:
        return self.epsilon(delta)

    def record(self, rnd: int, strategy: Any) -> dict[str, Any]:
        for u in strategy.last_updates:
            counts = u.metrics.get("label-counts")
            if isinstance(counts, list) and len(counts) == len(self.total):
                self.total += np.asarray(counts, dtype=np.float64)
        noisy = self.total + np.asarray(self.counter.update(np.zeros_like(self.total)))
        self.released = [round(float(v), 3) for v in noisy]
        return {"released": self.released}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": int(self.counter.steps)}


def _levels(horizon: int, kind: str) -> float:
    """Calibrate the counter so that each tree node has noise multiplier ``counter_noise``: ρ = L/(2σ²)."""
    return float(max(1, math.ceil(math.log2(horizon + 1)))) if kind in ("tree", "honaker") else 1.0


class PrivacyLedger:
    """Every mechanism of the run, the budget check and ``privacy.jsonl`` records."""

    def __init__(self, scenario, strategy, server) -> None:
        self.scenario = scenario
        self.strategy = strategy
        p = scenario.privacy
        self.delta, self.budget = p.delta, p.max_epsilon
        self.mechanisms: list[_Mechanism] = []
        if p.mechanism == "dp-sgd":
            self.mechanisms.append(DPSGDMechanism(scenario, server.federation.client_sizes()))
        elif p.mechanism == "dp-fedavg":
            self.mechanisms.append(ClientLevelMechanism(scenario))
        elif p.mechanism == "dp-ftrl":
            self.mechanisms.append(DPFTRLMechanism(strategy))
        if p.release_counters and p.counter_noise > 0:
            self.mechanisms.append(ParticipationCounter(scenario))
            self.mechanisms.append(LabelHistogramCounter(scenario, int(server.federation.num_classes)))

    def before_round(self, rnd: int) -> None:
        """Refuse round ``rnd`` if, once run, the total ε(δ) could exceed the budget."""
        if not self.budget:
            return
        nxt = {m.name: m.epsilon_next(rnd, self.delta) for m in self.mechanisms}
        total = sum(nxt.values())
        if total > self.budget:
            spent = sum(m.epsilon(self.delta) for m in self.mechanisms)
            parts = ", ".join(f"{k} {v:.4g}" for k, v in nxt.items())
            raise PrivacyBudgetExceeded(
                f"round {rnd} would bring the total to ε = {total:.4g} ({parts}) at δ = {self.delta:g}, above "
                f"privacy.max_epsilon = {self.budget:g} (spent so far: ε = {spent:.4g}); the run stopped before "
                f"round {rnd}, everything written so far is valid",
                "raise privacy.max_epsilon or privacy.noise_multiplier, lower the sampling rate, or run fewer rounds",
            )

    def after_round(self, rnd: int) -> list[dict[str, Any]]:
        records = []
        for m in self.mechanisms:
            extra = m.record(rnd, self.strategy)
            records.append({"round": rnd, "mechanism": m.name, "epsilon": _finite(m.epsilon(self.delta)),
                            "delta": self.delta, **extra})
        if records:
            total = sum(r["epsilon"] for r in records)
            records.append({"round": rnd, "mechanism": "total", "epsilon": total, "delta": self.delta,
                            "budget": self.budget or None})
        return records

    def released(self) -> dict[str, float]:
        return {f"released/{m.name.split('/')[-1]}": m.released for m in self.mechanisms
                if isinstance(m, (ParticipationCounter, LabelHistogramCounter)) and m.released is not None}

    def state_dict(self) -> dict[str, Any]:
        return {m.name: m.state_dict() for m in self.mechanisms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m in self.mechanisms:
            if m.name in state:
                m.load_state_dict(state[m.name])


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 1e300


def build_ledger(scenario, strategy, server) -> PrivacyLedger | None:
    if scenario.privacy.mechanism == "none":
        return None
    return PrivacyLedger(scenario, strategy, server)

