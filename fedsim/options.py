"""Validate a raw settings table against a frozen dataclass of options with defaults."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedsim.errors import ConfigError


def build_options(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``; errors name ``<prefix>.<key>``.

    Unknown keys and values whose type does not match the default's type are rejected with the
    allowed keys (or the expected type) in the message. ``__post_init__`` ``ValueError`` messages
    are re-raised as :class:`ConfigError` on ``prefix``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}", "unknown option", _unknown_option_hint(prefix, key, sorted(fields)))
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        _check_type(f"{prefix}.{key}", default, value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        # a message that opens with an option's name ("keep must be in (0, 1]") names that option's key
        named = next((k for k in sorted(fields, key=len, reverse=True) if str(err).startswith(f"{k} ")), None)
        key = f"{prefix}.{named}" if named else prefix
        raise ConfigError(key, str(err), "see the option's documentation in `fedsim list`") from None


def _unknown_option_hint(prefix: str, key: str, allowed: list[str]) -> str:
    """Did-you-mean for an unknown option: alike options, or the key as a setting of a scenario section."""
    import difflib

    from fedsim.config import Scenario
    from fedsim.config_hints import did_you_mean

    guesses = [f"{prefix}.{k}" for k in difflib.get_close_matches(key, allowed, n=3, cutoff=0.7)]
    guesses += [g for g in did_you_mean(Scenario, prefix.split(".")[0], key) if g not in guesses]
    meant = f"did you mean {' or '.join(f'`{g}`' for g in guesses[:3])}? " if guesses else ""
    return f"{meant}allowed: {', '.join(allowed) or '(none)'}"


def _check_type(key: str, default: Any, value: Any) -> None:
    if default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        want = "true/false"
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            ok = False
        want = "an integer" if isinstance(default, int) else "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, (list, tuple)):
        ok, want = isinstance(value, (list, tuple)), "a list"
    else:
        return
    if not ok:
        raise ConfigError(key, f"expected {want}, got {value!r}")
