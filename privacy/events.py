"""Privacy events: what one release of a mechanism is, independently of how it is accounted.

Every event is a frozen dataclass (hashable, so an accountant's ledger can merge repeats and
cache ε) that round-trips through JSON with :func:`event_to_dict` / :func:`event_from_dict`.

* :class:`PoissonGaussianEvent` -- a Gaussian release on a Poisson sample of rate ``q``
  (add/remove-one neighbours; DP-SGD, user-level DP-FedAvg; Mironov et al. 2019).
* :class:`FixedSizeGaussianEvent` -- a Gaussian release on ``m`` of ``n`` records drawn without
  replacement (replace-one neighbours; Wang, Balle, Kasiviswanathan, AISTATS 2019).
* :class:`GaussianEvent` -- a plain Gaussian release.
* :class:`ZCDPEvent` -- a ρ-zCDP release (tree aggregation, matrix factorisation, DP-FTRL).

:func:`to_dp_event` translates an event into Google's ``dp_accounting`` event algebra and
:func:`event_rho` gives its zCDP parameter; :func:`sampled_event` builds the event of one sampled
Gaussian round or step from a sampling scheme name.

References
----------
Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019.
Wang, Balle, Kasiviswanathan, "Subsampled Rényi Differential Privacy and Analytical Moments
Accountant", AISTATS 2019.
Bun, Steinke, "Concentrated Differential Privacy", TCC 2016 (a Gaussian with noise multiplier z
is 1/(2z²)-zCDP).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar, Union

from fedsim.errors import ConfigError

if TYPE_CHECKING:  # dp_accounting costs about a second to import: only where it is used
    import dp_accounting

__all__ = [
    "EVENT_TYPES",
    "Event",
    "FixedSizeGaussianEvent",
    "GaussianEvent",
    "PoissonGaussianEvent",
    "ZCDPEvent",
    "event_from_dict",
    "event_rho",
    "event_sample_rate",
    "event_to_dict",
    "sampled_event",
    "to_dp_event",
]


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
#: Event classes by their ``kind`` tag (the key written by :func:`event_to_dict`).
EVENT_TYPES: dict[str, type] = {
    cls.kind: cls for cls in (PoissonGaussianEvent, FixedSizeGaussianEvent, GaussianEvent, ZCDPEvent)
}


# ---------------------------------------------------------------------------------- serialisation
def event_to_dict(event: Event) -> dict[str, Any]:
    """JSON-able form of an event (``{"kind": ..., **fields}``)."""
    return {"kind": event.kind, **asdict(event)}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Inverse of :func:`event_to_dict`; raises :class:`ConfigError` on an unknown kind."""
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind not in EVENT_TYPES:
        raise ConfigError("privacy.events", f"unknown privacy event kind {kind!r}",
                          f"valid kinds: {', '.join(sorted(EVENT_TYPES))}")
    return EVENT_TYPES[kind](**fields)


# ------------------------------------------------------------------------------------ conversions
def event_sample_rate(event: Event) -> float:
    """Fraction of the records an event touches (1.0 for the events without sampling)."""
    return float(getattr(event, "sample_rate", 1.0))


def event_rho(event: Event) -> float:
    """ρ such that one release of ``event`` is ρ-zCDP, ignoring any subsampling amplification.

    A Gaussian with noise multiplier z is 1/(2z²)-zCDP (a fixed-size event's z is divided by its
    replace-one sensitivity); ``inf`` for a release without noise, 0 for one that samples nobody.
    """
    if isinstance(event, ZCDPEvent):
        return event.rho
    if isinstance(event, FixedSizeGaussianEvent):
        z = event.noise_multiplier / event.replace_sensitivity
    else:
        z = event.noise_multiplier
    if event_sample_rate(event) == 0:
        return 0.0
    return math.inf if z == 0 else 1.0 / (2.0 * z * z)


def to_dp_event(event: Event) -> dp_accounting.DpEvent:
    """Translate one of our events into a ``dp_accounting`` event.

    Raises
    ------
    ConfigError
        If ``event`` is not one of the event classes of this module.
    """
    import dp_accounting

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
