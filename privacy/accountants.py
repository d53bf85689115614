"""Privacy accountants: a ledger of composed events, with ε(δ) recomputed from it.

The bookkeeping (:class:`Accountant`: a list of ``(event, count)`` pairs that round-trips through
``state_dict``) is kept apart from the math, which is Google's ``dp_accounting`` for RDP and PLD and
a closed form for zCDP.

Events (all frozen dataclasses, hashable, JSON-able through :func:`event_to_dict`):

* :class:`PoissonGaussianEvent` -- a Gaussian release on a Poisson sample of rate ``q``
  (add/remove-one neighbours; DP-SGD, user-level DP-FedAvg; Mironov et al. 2019).
* :class:`FixedSizeGaussianEvent` -- a Gaussian release on ``m`` of ``n`` records drawn without
  replacement (replace-one neighbours; Wang, Balle, Kasiviswanathan, AISTATS 2019).
* :class:`GaussianEvent` -- a plain Gaussian release.
* :class:`ZCDPEvent` -- a ρ-zCDP release (tree aggregation, matrix factorisation, DP-FTRL).

Registry :data:`ACCOUNTANTS`: ``"rdp"``, ``"pld"``, ``"zcdp"``.

References
----------
Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019.
Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020, Prop. 12.
Bun, Steinke, "Concentrated Differential Privacy", TCC 2016, Prop. 1.3.
Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the Dots: Tighter Discrete Approximations
of Privacy Loss Distributions", PETS 2022 (the PLD accountant of dp_accounting).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, ClassVar, Union

import dp_accounting
import numpy as np
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

from fedsim.errors import ConfigError, PrivacyBudgetExceeded
from fedsim.privacy.analysis import (_log_a_fractional, bun_steinke_epsilon, gaussian_epsilon_exact,
                                     zcdp_to_epsilon)
from fedsim.registry import Registry

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "FixedSizeGaussianEvent",
    "GaussianEvent",
    "PldAccountant",
    "PoissonGaussianEvent",
    "RdpAccountant",
    "ZCDPEvent",
    "ZcdpAccountant",
    "bun_steinke_epsilon",
    "event_from_dict",
    "event_to_dict",
    "gaussian_epsilon_exact",
    "make_accountant",
    "poisson_gaussian_rdp",
    "sampled_event",
    "zcdp_to_epsilon",
]


# ----------------------------------------------------------------------------------------- events
def _check(ok: bool, key: str, message: str, hint: str) -> None:
    if not ok:
        raise ConfigError(key, message, hint)


def _check_noise(z: float) -> None:
    _check(z >= 0, "noise_multiplier", f"must be >= 0, got {z}", "use a positive noise multiplier (0: no privacy)")


@dataclass(frozen=True)
class PoissonGaussianEvent:
    """Gaussian noise of std ``noise_multiplier``·C on a Poisson sample (each record kept w.p. q)."""

    noise_multiplier: float
    sample_rate: float
    kind: ClassVar[str] = "poisson_gaussian"

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)
        _check(0 <= self.sample_rate <= 1, "sample_rate", f"must lie in [0, 1], got {self.sample_rate}",
               "pass the per-round/per-step inclusion probability q")


@dataclass(frozen=True)
class FixedSizeGaussianEvent:
    """Gaussian noise on ``sample_size`` of ``population`` records drawn without replacement.

    Neighbours are replace-one (the population size is public). ``noise_multiplier`` is std/C as for
    the Poisson event; replacing one clipped vector moves a sum by up to ``replace_sensitivity``·C
    (2 for arbitrary vectors: ‖u − v‖ ≤ ‖u‖ + ‖v‖), so the Gaussian is accounted with
    noise multiplier ``noise_multiplier / replace_sensitivity``.
    """

    noise_multiplier: float
    sample_size: int
    population: int
    replace_sensitivity: float = 2.0
    kind: ClassVar[str] = "fixed_size_gaussian"

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)
        _check(0 <= self.sample_size <= self.population and self.population >= 1, "sample_size",
               f"need 0 <= sample_size <= population, got {self.sample_size} of {self.population}",
               "pass the number of clients sampled per round and the number of clients")
        _check(self.replace_sensitivity > 0, "replace_sensitivity", "must be > 0",
               "2.0 for clipped vector sums; 1.0 only if replacing a record moves the sum by <= C")

    @property
    def sample_rate(self) -> float:
        return self.sample_size / self.population


@dataclass(frozen=True)
class GaussianEvent:
    """A Gaussian release with std ``noise_multiplier`` times the ℓ2 sensitivity."""

    noise_multiplier: float
    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)


@dataclass(frozen=True)
class ZCDPEvent:
    """A ρ-zCDP release.

    ``gaussian=True`` states that the release is a (linear) Gaussian mechanism whose privacy loss is
    exactly that of one Gaussian with μ = Δ/σ = sqrt(2ρ) -- true of the tree, Honaker and matrix
    factorisation counters and of DP-FTRL. The PLD accountant needs that to account it exactly.
    """

    rho: float
    gaussian: bool = True
    kind: ClassVar[str] = "zcdp"

    def __post_init__(self) -> None:
        _check(self.rho >= 0, "rho", f"must be >= 0, got {self.rho}", "ρ is a zCDP parameter, e.g. L/(2z²)")


Event = Union[PoissonGaussianEvent, FixedSizeGaussianEvent, GaussianEvent, ZCDPEvent]
_EVENT_TYPES: dict[str, type] = {
    cls.kind: cls for cls in (PoissonGaussianEvent, FixedSizeGaussianEvent, GaussianEvent, ZCDPEvent)
}


def event_to_dict(event: Event) -> dict[str, Any]:
    """JSON-able form of an event (``{"kind": ..., **fields}``)."""
    return {"kind": event.kind, **asdict(event)}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Inverse of :func:`event_to_dict`; raises :class:`ConfigError` on an unknown kind."""
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind not in _EVENT_TYPES:
        raise ConfigError("privacy.events", f"unknown privacy event kind {kind!r}",
                          f"valid kinds: {', '.join(sorted(_EVENT_TYPES))}")
    return _EVENT_TYPES[kind](**fields)


# ------------------------------------------------------------------------------------------- math
@contextlib.contextmanager
def _quiet_absl():
    """dp_accounting logs a warning for every fractional order whose series fails to converge (it then
    excludes that order, which only makes ε larger, i.e. safe). Keep those out of run logs."""
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _check_delta(delta: float) -> None:
    _check(0 < delta < 1, "privacy.delta", f"δ must lie in (0, 1), got {delta}",
           "a typical δ is 1e-5, or below 1/(number of users)")


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
        if type(event) not in _EVENT_TYPES.values():
            raise ConfigError("event", f"unsupported privacy event {event!r}",
                              f"use one of {', '.join(c.__name__ for c in _EVENT_TYPES.values())}")
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

    def would_exceed(self, event: Event, count: int, max_epsilon: float, delta: float) -> bool:
        """True when composing ``count`` × ``event`` would bring ε(δ) above ``max_epsilon``."""
        return self.epsilon_if(event, count, delta) > max_epsilon

    def spend(self, event: Event, count: int, *, max_epsilon: float, delta: float) -> float:
        """Compose the releases if they fit the budget, else raise :class:`PrivacyBudgetExceeded`.

        Returns the new ε(δ).
        """
        eps = self.epsilon_if(event, count, delta)
        if eps > max_epsilon:
            raise PrivacyBudgetExceeded(
                f"the next release would bring ε to {eps:.4g} at δ={delta:g}, above the budget "
                f"{max_epsilon:g} ({self.name} accountant; spent so far ε={self.epsilon(delta):.4g})",
                "raise privacy.max_epsilon, raise the noise multiplier, lower the sample rate, "
                "or run fewer rounds",
            )
        self.compose(event, count)
        return eps

    def _epsilon(self, ledger: list[tuple[Event, int]], delta: float) -> float:
        _check_delta(delta)
        if not ledger:
            return 0.0
        key = (tuple(ledger), float(delta))
        if key not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            if any(_event_rho(ev) == math.inf for ev, _ in ledger):  # a release without noise
                self._cache[key] = math.inf
            else:
                with _quiet_absl():
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


def _sample_rate(event: Event) -> float:
    return float(getattr(event, "sample_rate", 1.0))


ACCOUNTANTS: Registry[type[Accountant]] = Registry("accountant")


@functools.lru_cache(maxsize=4096)
def poisson_gaussian_rdp(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP ε(α) of one Poisson-subsampled Gaussian step at each order (add/remove neighbours).

    Integer orders come from dp_accounting's exact binomial expansion. For fractional orders
    dp_accounting 0.6 sums |terms| of a slowly converging series and drops the orders where 1000
    terms do not converge (typically α < 2 with q ≳ 0.05); both are safe but loose, by up to 20 %
    in ε at large q. Fractional orders are therefore computed by :func:`_log_a_fractional`
    (checked against a 40-digit mpmath integral and Opacus's signed series: ≤ 1e-7 relative),
    except for σ < 0.1, where dp_accounting's series converges fast and is kept.
    """
    alphas = np.asarray(orders, dtype=np.float64)
    frac = alphas != np.floor(alphas)
    # Below σ = 0.1 dp_accounting's series converges in a few terms (and matches Opacus to 1e-10)
    # while the integrand gets too peaked for quick quadrature: keep dp_accounting there.
    exact = ~frac | (sample_rate in (0.0, 1.0)) | (noise_multiplier < 0.1)
    rdp = np.zeros(len(alphas))
    if exact.any():
        acc = dp_rdp.RdpAccountant(orders=list(alphas[exact]))
        with _quiet_absl():
            acc.compose(_to_dp_event(PoissonGaussianEvent(noise_multiplier, sample_rate)))
        rdp[exact] = acc.rdp
    if (~exact).any():
        rdp[~exact] = _log_a_fractional(sample_rate, noise_multiplier, alphas[~exact]) / (alphas[~exact] - 1.0)
    rdp.setflags(write=False)
    return rdp


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
        kinds = {type(ev) for ev, _ in ledger if _sample_rate(ev) < 1}
        if PoissonGaussianEvent in kinds and FixedSizeGaussianEvent in kinds:
            raise ConfigError("privacy.sampling",
                              "Poisson-sampled (add/remove neighbours) and fixed-size (replace-one "
                              "neighbours) releases cannot be composed in one RDP ledger",
                              "use one sampling scheme for the whole run")

    @staticmethod
    def _event_rdp(event: Event, orders: tuple[float, ...]) -> np.ndarray:
        if isinstance(event, PoissonGaussianEvent):
            return poisson_gaussian_rdp(event.sample_rate, event.noise_multiplier, orders)
        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE
                    if isinstance(event, FixedSizeGaussianEvent) and event.sample_rate < 1
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc = dp_rdp.RdpAccountant(orders=list(orders), neighboring_relation=relation)
        acc.compose(_to_dp_event(event))
        return acc.rdp

    def rdp_curve(self, ledger: list[tuple[Event, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(orders, total RDP at each order) of ``ledger`` (default: this accountant's)."""
        orders = tuple(self.orders or DEFAULT_RDP_ORDERS)
        total = np.zeros(len(orders))
        for event, count in self._ledger if ledger is None else ledger:
            total = total + count * self._event_rdp(event, orders)
        return np.array(orders), total

    def _epsilon_from_ledger(self, ledger: list[tuple[Event, int]], delta: float) -> float:
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

    def __init__(self, value_discretization_interval: float = 1e-4) -> None:
        super().__init__()
        self.value_discretization_interval = float(value_discretization_interval)

    def _options(self) -> dict[str, Any]:
        return {"value_discretization_interval": self.value_discretization_interval}

    def _validate(self, ledger: list[tuple[Event, int]]) -> None:
        for ev, _ in ledger:
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
        acc = dp_pld.PLDAccountant(value_discretization_interval=self.value_discretization_interval)
        for event, count in ledger:
            if isinstance(event, ZCDPEvent):
                if event.rho == 0:
                    continue
                event = GaussianEvent(1.0 / math.sqrt(2.0 * event.rho))
            acc.compose(_to_dp_event(event), count)
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
            if _sample_rate(ev) < 1 and not isinstance(ev, ZCDPEvent):
                raise ConfigError("privacy.accountant",
                                  "the zCDP accountant has no amplification by subsampling, so it "
                                  f"cannot account a subsampled release ({ev})",
                                  "use accountant='rdp' or 'pld' for sampled rounds")

    def rho(self) -> float:
        """Total ρ composed so far."""
        return _total_rho(self._ledger)

    def _epsilon_from_ledger(self, ledger: list[tuple[Event, int]], delta: float) -> float:
        return zcdp_to_epsilon(_total_rho(ledger), delta)


def _event_rho(event: Event) -> float:
    if isinstance(event, ZCDPEvent):
        return event.rho
    if isinstance(event, FixedSizeGaussianEvent):
        z = event.noise_multiplier / event.replace_sensitivity
    else:
        z = event.noise_multiplier
    if _sample_rate(event) == 0:
        return 0.0
    return math.inf if z == 0 else 1.0 / (2.0 * z * z)


def _total_rho(ledger: list[tuple[Event, int]]) -> float:
    return math.fsum(n * _event_rho(ev) for ev, n in ledger)


def _to_dp_event(event: Event) -> dp_accounting.DpEvent:
    """Translate one of our events into a dp_accounting event."""
    if isinstance(event, GaussianEvent):
        return dp_accounting.GaussianDpEvent(event.noise_multiplier)
    if isinstance(event, PoissonGaussianEvent):
        gauss = dp_accounting.GaussianDpEvent(event.noise_multiplier)
        return gauss if event.sample_rate == 1 else dp_accounting.PoissonSampledDpEvent(event.sample_rate, gauss)
    if isinstance(event, FixedSizeGaussianEvent):
        gauss = dp_accounting.GaussianDpEvent(event.noise_multiplier / event.replace_sensitivity)
        if event.sample_size == event.population:
            return gauss
        return dp_accounting.SampledWithoutReplacementDpEvent(event.population, event.sample_size, gauss)
    if isinstance(event, ZCDPEvent):
        return dp_accounting.ZCDpEvent(event.rho)
    raise ConfigError("event", f"unsupported privacy event {event!r}", "use an event class of this module")


def make_accountant(name: str, **options: Any) -> Accountant:
    """Build a registered accountant by name (``"rdp"``, ``"pld"``, ``"zcdp"``)."""
    return ACCOUNTANTS.get(name, key="privacy.accountant")(**options)


def sampled_event(noise_multiplier: float, sample_rate: float, sampling: str = "poisson",
                  population: int | None = None) -> Event:
    """The event of one sampled Gaussian round/step.

    ``sampling="poisson"`` gives :class:`PoissonGaussianEvent`; ``"fixed"`` (without replacement)
    gives :class:`FixedSizeGaussianEvent` with ``sample_size = round(q·population)``, or, when the
    population is unknown, the smallest fraction m/n equal to ``sample_rate`` (RDP uses only m/n).
    """
    if sampling == "poisson":
        return PoissonGaussianEvent(noise_multiplier, sample_rate)
    if sampling in ("fixed", "without_replacement"):
        _check(0 < sample_rate <= 1, "sample_rate", f"must lie in (0, 1], got {sample_rate}",
               "pass m/n, the fraction of clients sampled per round")
        if population is None:
            frac = Fraction(sample_rate).limit_denominator(10**9)
            return FixedSizeGaussianEvent(noise_multiplier, frac.numerator, frac.denominator)
        return FixedSizeGaussianEvent(noise_multiplier, max(1, round(sample_rate * population)), population)
    raise ConfigError("privacy.sampling", f"unknown sampling scheme {sampling!r}",
                      "use 'poisson' or 'fixed' (fixed-size batches drawn without replacement)")
