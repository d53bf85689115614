"""Privacy accountants: a ledger of composed events, with ε(δ) recomputed from it.

Only the bookkeeping lives here (as in Opacus, whose accountants keep a history and defer to an
``analysis`` module): :class:`Accountant` holds a list of ``(event, count)`` pairs that round-trips
through ``state_dict``; the events are in :mod:`fedsim.privacy.events` and the math is Google's
``dp_accounting`` for RDP and PLD, plus :mod:`fedsim.privacy.analysis` (fractional-order RDP of the
Poisson-subsampled Gaussian, the zCDP → (ε, δ) conversion).

Registry :data:`ACCOUNTANTS`: ``"rdp"`` (:class:`RdpAccountant`), ``"pld"`` (:class:`PldAccountant`),
``"zcdp"`` (:class:`ZcdpAccountant`); build one with :func:`make_accountant`.

References
----------
Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019.
Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020, Prop. 12.
Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the Dots: Tighter Discrete Approximations
of Privacy Loss Distributions", PETS 2022 (the PLD accountant of dp_accounting).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from fedsim.errors import ConfigError
from fedsim.privacy.bounds import MIN_NOISE, PLD_MIN_NOISE
from fedsim.privacy.analysis import poisson_gaussian_rdp, quiet_absl, zcdp_to_epsilon
from fedsim.privacy.events import (EVENT_TYPES, Event, FixedSizeGaussianEvent, GaussianEvent, PoissonGaussianEvent,
                                   ZCDPEvent, event_from_dict, event_rho, event_sample_rate, event_to_dict,
                                   to_dp_event)
from fedsim.registry import Registry

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "PldAccountant",
    "RdpAccountant",
    "ZcdpAccountant",
    "make_accountant",
    # re-exported for callers that import them from here (the privacy ledger and its mechanisms)
    "FixedSizeGaussianEvent",
    "PoissonGaussianEvent",
    "zcdp_to_epsilon",
]


# ----------------------------------------------------------------------------------- bookkeeping
class Accountant:
    """Ledger of composed privacy events; ε(δ) is always recomputed from the ledger.

    Subclasses implement :meth:`_epsilon_from_ledger`. ``state_dict`` holds only the ledger (and the
    accountant's name and options), so a restored accountant reports bit-identical ε.

    Examples
    --------
    >>> acc = make_accountant("rdp")
    >>> acc.compose(PoissonGaussianEvent(1.5, 0.04), 2250)
    >>> round(acc.epsilon(1e-5), 3)
    7.329
    """

    name: ClassVar[str] = ""
    #: the smallest non-zero Gaussian noise multiplier this accountant takes (``fedsim.privacy.bounds``)
    min_noise: ClassVar[float] = MIN_NOISE

    def __init__(self) -> None:
        self._ledger: list[tuple[Event, int]] = []
        self._cache: dict[tuple, float] = {}

    # -- ledger ------------------------------------------------------------------------------
    @property
    def ledger(self) -> list[tuple[Event, int]]:
        """A copy of the composed ``(event, count)`` pairs, oldest first."""
        return list(self._ledger)

    @staticmethod
    def _appended(ledger: list[tuple[Event, int]], event: Event, count: int) -> list[tuple[Event, int]]:
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
            raise ConfigError("count", f"must be a non-negative integer, got {count!r}",
                              "pass the number of identical releases (rounds or steps)")
        if type(event) not in EVENT_TYPES.values():
            raise ConfigError("event", f"unsupported privacy event {event!r}",
                              f"use one of {', '.join(c.__name__ for c in EVENT_TYPES.values())}")
        out = list(ledger)
        if count == 0:
            return out
        if out and out[-1][0] == event:  # same release repeated: merge (keeps the ledger short)
            out[-1] = (event, out[-1][1] + int(count))
        else:
            out.append((event, int(count)))
        return out

    def compose(self, event: Event, count: int = 1) -> None:
        """Record ``count`` releases of ``event``; raises :class:`ConfigError` if unsupported here."""
        new = self._appended(self._ledger, event, count)
        self._validate(new)
        self._ledger = new

    def epsilon(self, delta: float) -> float:
        """ε such that everything composed so far is (ε, δ)-DP."""
        return self._epsilon(self._ledger, delta)

    def epsilon_if(self, event: Event, count: int, delta: float) -> float:
        """ε(δ) after composing ``count`` more ``event`` releases, without composing them."""
        new = self._appended(self._ledger, event, count)
        self._validate(new)
        return self._epsilon(new, delta)

    def _epsilon(self, ledger: list[tuple[Event, int]], delta: float) -> float:
        if not 0 < delta < 1:
            raise ConfigError("privacy.delta", f"δ must lie in (0, 1), got {delta}",
                              "a typical δ is 1e-5, or below 1/(number of users)")
        if not ledger:
            return 0.0
        key = (tuple(ledger), float(delta))
        if key not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            if any(event_rho(ev) == math.inf for ev, _ in ledger):  # a release without noise
                self._cache[key] = math.inf
            else:
                with quiet_absl():
                    self._cache[key] = float(self._epsilon_from_ledger(ledger, delta))
        return self._cache[key]

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the accountant name, its options and the ledger."""
        return {
            "accountant": self.name,
            "options": self._options(),
            "events": [{"event": event_to_dict(ev), "count": n} for ev, n in self._ledger],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the ledger with the one in ``state`` (from :meth:`state_dict`)."""
        if state.get("accountant") != self.name:
            raise ConfigError("privacy.accountant",
                              f"checkpoint was written by the {state.get('accountant')!r} accountant, "
                              f"this run uses {self.name!r}",
                              "resume with the same privacy.accountant as the original run")
        if state.get("options", {}) != self._options():
            raise ConfigError("privacy.accountant",
                              f"checkpoint accountant options {state.get('options')} differ from "
                              f"{self._options()}", "resume with the accountant options of the original run")
        ledger = [(event_from_dict(item["event"]), int(item["count"])) for item in state["events"]]
        self._validate(ledger)
        self._ledger = ledger
        self._cache.clear()

    # -- to implement ------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {}

    def _validate(self, ledger: list[tuple[Event, int]]) -> None:
        """Raise :class:`ConfigError` if this accountant cannot account ``ledger``."""

    def _epsilon_from_ledger(self, ledger: list[tuple[Event, int]], delta: float) -> float:
        raise NotImplementedError


ACCOUNTANTS: Registry[type[Accountant]] = Registry("accountant")


@ACCOUNTANTS.register("rdp")
class RdpAccountant(Accountant):
    """Rényi DP accountant on ``dp_accounting`` (its default orders 1.1…10.9, 11…63, 128…1024).

    Poisson events use add/remove-one neighbours (fractional orders by quadrature, see
    :func:`poisson_gaussian_rdp`); fixed-size (without-replacement) events use replace-one
    neighbours (WBK 2019, Thm. 27, dp_accounting); the two cannot be mixed in one ledger. The
    RDP → (ε, δ) conversion is dp_accounting's ``compute_epsilon`` (CKS 2020, Prop. 12).
    """

    name = "rdp"

    def __init__(self, orders: list[float] | None = None) -> None:
        super().__init__()
        self.orders = None if orders is None else [float(a) for a in orders]

    def _options(self) -> dict[str, Any]:
        return {} if self.orders is None else {"orders": self.orders}

    def _validate(self, ledger: list[tuple[Event, int]]) -> None:
        kinds = {type(ev) for ev, _ in ledger if event_sample_rate(ev) < 1}
        if PoissonGaussianEvent in kinds and FixedSizeGaussianEvent in kinds:
            raise ConfigError("privacy.sampling",
                              "Poisson-sampled (add/remove neighbours) and fixed-size (replace-one "
                              "neighbours) releases cannot be composed in one RDP ledger",
                              "use one sampling scheme for the whole run")

    @staticmethod
    def _event_rdp(event: Event, orders: tuple[float, ...]) -> np.ndarray:
        if isinstance(event, PoissonGaussianEvent):
            return poisson_gaussian_rdp(event.sample_rate, event.noise_multiplier, orders)
        import dp_accounting  # about a second to import: only where it is used
        from dp_accounting import rdp as dp_rdp

        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE
                    if isinstance(event, FixedSizeGaussianEvent) and event.sample_rate < 1
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc = dp_rdp.RdpAccountant(orders=list(orders), neighboring_relation=relation)
        acc.compose(to_dp_event(event))
        return acc.rdp

    def rdp_curve(self, ledger: list[tuple[Event, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(orders, total RDP at each order) of ``ledger`` (default: this accountant's)."""
        from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

        orders = tuple(self.orders or DEFAULT_RDP_ORDERS)
        total = np.zeros(len(orders))
        for event, count in self._ledger if ledger is None else ledger:
            total = total + count * self._event_rdp(event, orders)
        return np.array(orders), total

    def _epsilon_from_ledger(self, ledger: list[tuple[Event, int]], delta: float) -> float:
        from dp_accounting import rdp as dp_rdp

        orders, total = self.rdp_curve(ledger)
        return float(dp_rdp.compute_epsilon(orders, total, delta)[0])


@ACCOUNTANTS.register("pld")
class PldAccountant(Accountant):
    """Privacy-loss-distribution accountant (``dp_accounting.pld.PLDAccountant``), add/remove-one.

    Tighter than RDP (near-exact up to discretisation, which is done pessimistically). dp_accounting
    0.6 has no PLD for sampling without replacement, so :class:`FixedSizeGaussianEvent` with m < n
    is refused with a :class:`ConfigError` (use ``"rdp"`` or Poisson sampling). A
    :class:`ZCDPEvent` is accounted as a Gaussian with μ = sqrt(2ρ), which is exact when
    ``gaussian=True``; other zCDP events are refused.
    """

    name = "pld"
    min_noise = PLD_MIN_NOISE

    def __init__(self, value_discretization_interval: float = 1e-4) -> None:
        super().__init__()
        self.value_discretization_interval = float(value_discretization_interval)

    def _options(self) -> dict[str, Any]:
        return {"value_discretization_interval": self.value_discretization_interval}

    def _validate(self, ledger: list[tuple[Event, int]]) -> None:
        for ev, _ in ledger:
            z = _gaussian_noise(ev)
            if 0 < z < self.min_noise:
                raise ConfigError("privacy.accountant",
                                  f"the PLD accountant's loss grid at noise multiplier {z:.3g} (below "
                                  f"{self.min_noise:g}) needs minutes and gigabytes, growing as 1/σ² "
                                  "(fedsim.privacy.bounds)",
                                  "use the 'rdp' accountant for such noise (milliseconds), or more noise")
            if isinstance(ev, FixedSizeGaussianEvent) and ev.sample_rate < 1:
                raise ConfigError("privacy.accountant",
                                  "the PLD accountant cannot account sampling without replacement "
                                  "(dp_accounting 0.6 has no PLD for it)",
                                  "use accountant='rdp' for fixed-size client sampling, or Poisson sampling")
            if isinstance(ev, ZCDPEvent) and not ev.gaussian:
                raise ConfigError("privacy.accountant",
                                  "the PLD accountant needs the mechanism behind a zCDP event; this one "
                                  "is not marked as a Gaussian mechanism",
                                  "use accountant='rdp' or 'zcdp' for generic ρ-zCDP releases")

    def _epsilon_from_ledger(self, ledger: list[tuple[Event, int]], delta: float) -> float:
        from dp_accounting import pld as dp_pld

        acc = dp_pld.PLDAccountant(value_discretization_interval=self.value_discretization_interval)
        for event, count in ledger:
            if isinstance(event, ZCDPEvent):
                if event.rho == 0:
                    continue
                event = GaussianEvent(1.0 / math.sqrt(2.0 * event.rho))
            acc.compose(to_dp_event(event), count)
        return acc.get_epsilon(delta)


@ACCOUNTANTS.register("zcdp")
class ZcdpAccountant(Accountant):
    """zCDP accountant: ρ's add up; ε from :func:`zcdp_to_epsilon` (CKS 2020 conversion).

    A Gaussian with noise multiplier z is 1/(2z²)-zCDP. Subsampling has no useful zCDP
    amplification, so Poisson or fixed-size events with rate < 1 are refused (use ``"rdp"``/``"pld"``).
    """

    name = "zcdp"

    def _validate(self, ledger: list[tuple[Event, int]]) -> None:
        for ev, _ in ledger:
            if event_sample_rate(ev) < 1 and not isinstance(ev, ZCDPEvent):
                raise ConfigError("privacy.accountant",
                                  "the zCDP accountant has no amplification by subsampling, so it "
                                  f"cannot account a subsampled release ({ev})",
                                  "use accountant='rdp' or 'pld' for sampled rounds")

    def rho(self) -> float:
        """Total ρ composed so far."""
        return _total_rho(self._ledger)

    def _epsilon_from_ledger(self, ledger: list[tuple[Event, int]], delta: float) -> float:
        return zcdp_to_epsilon(_total_rho(ledger), delta)


def _gaussian_noise(event: Event) -> float:
    """The noise multiplier of one release of ``event``, 1/sqrt(2ρ) from its ρ (:func:`event_rho`); 0 for a
    release without noise or one that samples nobody."""
    rho = event_rho(event)
    return 1.0 / math.sqrt(2.0 * rho) if 0 < rho < math.inf else 0.0


def _total_rho(ledger: list[tuple[Event, int]]) -> float:
    return math.fsum(n * event_rho(ev) for ev, n in ledger)


def make_accountant(name: str, **options: Any) -> Accountant:
    """Build a registered accountant by name (``"rdp"``, ``"pld"``, ``"zcdp"``)."""
    return ACCOUNTANTS.get(name, key="privacy.accountant")(**options)
