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
            raise ConfigError(f"{prefix}.{key}", "unknown option",
                              f"allowed: {', '.join(sorted(fields)) or '(none)'}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        _check_type(f"{prefix}.{key}", default, value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(prefix, str(err), "see the option's documentation in `fedsim list`") from None


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
