"""The run's privacy ledger: ε(δ) per round for every mechanism, and the budget check.

The run loop owns the ledger. It calls :meth:`PrivacyLedger.before_round` before any client is
contacted (it raises :class:`~fedsim.errors.PrivacyBudgetExceeded` when running the round could push
the total past ``privacy.max_epsilon``) and :meth:`PrivacyLedger.after_round` after aggregation with
the round's :class:`~fedsim.privacy.mechanisms.RoundOutcome` (it composes what the round released and
returns the records written to ``privacy.jsonl``). Its state goes into every checkpoint.

The ledger composes mechanisms it is given (``fedsim.privacy.mechanisms``): the strategy's own
(DP-FedAvg, DP-FTRL: ``FedSimStrategy.privacy_mechanisms``), the clients' DP-SGD mirror, and the
released counters (``counter/participation``: the running number of participating clients;
``counter/label_histogram``: the running label histogram of the data that trained — clients send their
label counts with the update, they are never logged).

The ``total`` record is the basic composition (sum) of the mechanisms' ε at the same δ — a safe upper
bound when mechanisms protect the same unit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsim.errors import PrivacyBudgetExceeded
from fedsim.privacy.mechanisms import CounterMechanism, Mechanism, RoundOutcome
from fedsim.rng import numpy_rng


def _levels(horizon: int, kind: str) -> float:
    """Calibrate the counter so that each tree node has noise multiplier ``counter_noise``: ρ = L/(2σ²)."""
    return float(max(1, math.ceil(math.log2(horizon + 1)))) if kind in ("tree", "honaker") else 1.0


def released_counters(scenario, num_classes: int) -> list[CounterMechanism]:
    """The participation and label-histogram counters of ``[privacy]`` (none if switched off)."""
    p = scenario.privacy
    if not (p.release_counters and p.counter_noise > 0):
        return []
    rho = 1.0 / (2.0 * p.counter_noise ** 2) * _levels(scenario.run.rounds, p.counter)

    def rng(purpose: str) -> np.random.Generator:
        return np.random.default_rng() if p.secure_rng else numpy_rng(scenario.run.seed, "noise", purpose)

    return [CounterMechanism("counter/participation", p.counter, scenario.run.rounds, rho, rng("counter")),
            CounterMechanism("counter/label_histogram", p.counter, scenario.run.rounds, rho, rng("labels"),
                             shape=(num_classes,))]


class PrivacyLedger:
    """The mechanisms of a run, the budget check and ``privacy.jsonl`` records."""

    def __init__(self, mechanisms: list[Mechanism], delta: float, budget: float, target: float = 0.0) -> None:
        self.mechanisms = list(mechanisms)
        self.delta, self.budget = float(delta), float(budget)
        self.target = float(target)  # privacy.target_epsilon the noise was calibrated for (0: none)

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

    def after_round(self, rnd: int, outcome: RoundOutcome) -> list[dict[str, Any]]:
        records = []
        for m in self.mechanisms:
            extra = m.record(rnd, outcome)
            records.append({"round": rnd, "mechanism": m.name, "epsilon": _finite(m.epsilon(self.delta)),
                            "delta": self.delta, **extra})
        if records:
            total = sum(r["epsilon"] for r in records)
            records.append({"round": rnd, "mechanism": "total", "epsilon": total, "delta": self.delta,
                            "budget": self.budget or None, "target_epsilon": self.target or None})
        return records

    def round_metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The round's row in ``metrics.jsonl``: the total ε, each mechanism's ε under its own name, and
        the released counters. A mechanism that reports its worst client (DP-SGD: one accountant per
        client) is named so, ``epsilon/dp-sgd/worst_client``, as its ``privacy.jsonl`` line names
        ``worst_client``; a mean over clients is never reported."""
        out: dict[str, Any] = {}
        for r in records:
            key = "epsilon" if r["mechanism"] == "total" else f"epsilon/{r['mechanism']}"
            out[key + ("/worst_client" if "worst_client" in r else "")] = r["epsilon"]
        out.update(self.released())
        return out

    def released(self) -> dict[str, Any]:
        return {f"released/{m.name.split('/')[-1]}": m.released for m in self.mechanisms
                if isinstance(m, CounterMechanism) and m.released is not None}

    def state_dict(self) -> dict[str, Any]:
        return {m.name: m.state_dict() for m in self.mechanisms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m in self.mechanisms:
            if m.name in state:
                m.load_state_dict(state[m.name])


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 1e300


def build_ledger(scenario, strategy_mechanisms: list[Mechanism], federation) -> PrivacyLedger | None:
    """The ledger of a private run: the strategy's mechanisms, the DP-SGD mirror, the counters."""
    p = scenario.privacy
    if p.mechanism == "none":
        return None
    mechanisms = list(strategy_mechanisms)  # DP-FedAvg / DP-FTRL / the DP-SGD account
    mechanisms += released_counters(scenario, int(federation.num_classes))
    return PrivacyLedger(mechanisms, p.delta, p.max_epsilon, p.target_epsilon)
