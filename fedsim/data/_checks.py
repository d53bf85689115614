"""Validation helpers shared by dataset loaders and partitioners.

Each setting helper raises :class:`~fedsim.errors.ConfigError` naming the scenario key, so the user
sees which setting to change (e.g. ``data.partition.alpha``); the data helpers at the end raise
:class:`~fedsim.errors.DataError` naming the array and the fix.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from fedsim.errors import ConfigError, DataError

INT64_MAX = 2**63 - 1


def positive_int(key: str, value: Any) -> int:
    """Return ``value`` as an int >= 1 or raise naming ``key``."""
    return int_at_least(key, value, 1)


def int_at_least(key: str, value: Any, low: int) -> int:
    """Return ``value`` as an int >= ``low`` or raise naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(key, f"expected an integer, got {value!r}", f"set {key} to a whole number >= {low}")
    if value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}", f"set {key} to a whole number >= {low}")
    if value > INT64_MAX:  # NumPy would overflow it silently (a negative size, a wrapped seed)
        raise ConfigError(key, f"{value} does not fit a 64-bit integer", f"set {key} to at most {INT64_MAX}")
    return int(value)


def real(key: str, value: Any, *, low: float = -math.inf, low_inclusive: bool = True,
         high: float = math.inf, high_inclusive: bool = True) -> float:
    """Return ``value`` as a finite float inside the given interval or raise naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(key, f"expected a finite number, got {value!r}", f"set {key} to a number")
    value = float(value)
    too_low = value < low if low_inclusive else value <= low
    too_high = value > high if high_inclusive else value >= high
    if too_low or too_high:
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise ConfigError(key, f"must lie in {interval}, got {value}", f"set {key} to a value in {interval}")
    return value


def boolean(key: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise naming ``key``."""
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}", f"set {key} = true or false")
    return value


def choice(key: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise naming ``key``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r}; allowed: {', '.join(allowed)}",
                          f"set {key} to one of {', '.join(allowed)}")
    return value


def keyword_names(fn: Callable[..., Any], skip: int) -> list[str]:
    """Names of ``fn``'s parameters after the first ``skip`` positional ones."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def with_checked_keywords(prefix: str, skip: int, hidden: tuple[str, ...] = ()) -> Callable:
    """Decorator: reject keyword arguments that ``fn`` does not declare.

    The error names ``<prefix>.<key>`` and lists the allowed keys (``hidden`` ones, which the
    library fills in itself, are accepted but not advertised).
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        allowed = keyword_names(fn, skip)
        shown = [name for name in allowed if name not in hidden]
        params = inspect.signature(fn).parameters
        required = [name for name in allowed if params[name].default is inspect.Parameter.empty]

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            for key in kwargs:
                if key not in allowed:
                    raise ConfigError(
                        f"{prefix}.{key}",
                        f"unknown setting for '{fn.__name__}'; allowed: {', '.join(shown) or '(none)'}",
                        f"remove {prefix}.{key} or use one of the allowed settings",
                    )
            for key in required:
                if key not in kwargs:
                    raise ConfigError(f"{prefix}.{key}", f"'{fn.__name__}' needs this setting",
                                      f"set {prefix}.{key}")
            return fn(*args, **kwargs)

        return checked

    return deco


# ------------------------------------------------------------------------------------ data checks
#: most classes a dataset may have (labels ``0..K-1``): an output layer this wide is already beyond
#: the models fedsim builds; a larger "label" is almost always an id that was never encoded
MAX_CLASSES = 100_000


def int_in_range(key: str, value: Any, low: int, high: int) -> int:
    """Return ``value`` as an int in ``[low, high]`` or raise :class:`ConfigError` naming ``key``."""
    value = int_at_least(key, value, low)
    if value > high:
        raise ConfigError(key, f"must be <= {high}, got {value}", f"set {key} to a whole number in {low}..{high}")
    return value


def class_bound(num_samples: int) -> int:
    """Most classes ``num_samples`` labelled samples can be said to have: ``min(num_samples, MAX_CLASSES)``.

    More classes than samples means some classes have no example at all, so the labels are not the
    ``0..K-1`` encoding fedsim needs (a model would get an output per id, e.g. 10⁹ of them).
    """
    return max(1, min(int(num_samples), MAX_CLASSES))


def finite_features(name: str, x: np.ndarray, fix: str) -> np.ndarray:
    """``x`` as ``float32``; raise :class:`DataError` naming ``name`` for NaN/inf or a value beyond float32."""
    if not np.isfinite(x).all():
        raise DataError(f"{name} contains NaN or infinite values", fix)
    with np.errstate(over="ignore"):  # an overflow is reported below, as a DataError
        out = x.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{name} holds values beyond float32's range (±3.4e38), which become infinite",
                        f"rescale {name.split()[0]} (e.g. standardise each feature) before saving")
    return out


def labels_in_range(name: str, labels: np.ndarray, num_classes: int, fix: str) -> None:
    """Raise :class:`DataError` naming ``name`` unless every label lies in ``0..num_classes-1``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise DataError(f"{name} has label {bad}, outside 0..{num_classes - 1} ({num_classes} classes)", fix)
