"""Hints for scenario mistakes: "did you mean" for unknown keys, and privacy settings without effect.

An unknown key is first looked up as a setting of *another* section (``client.rounds`` is
``run.rounds``), then matched by similarity against the keys of its own section and of every other
one (:func:`difflib.get_close_matches`, Ratcliff/Obershelp "gestalt" matching, Python's standard
library). :func:`privacy_setting_without_effect` names a ``[privacy]`` setting that the chosen
mechanism would never read (e.g. ``noise_multiplier`` with ``mechanism = "none"``), so the schema can
refuse it instead of ignoring it.

This module imports nothing from :mod:`fedsim.config`: the schema passes its ``Scenario`` class in.
"""

from __future__ import annotations

import difflib
from typing import Any

from fedsim.errors import ConfigError

#: how alike two keys must be (difflib ratio) to be suggested
CUTOFF = 0.7


def section_fields(scenario_model: Any) -> dict[str, list[str]]:
    """``{section: [its keys]}`` of a pydantic ``Scenario`` model (a free-form table has none)."""
    out = {}
    for name, field in scenario_model.model_fields.items():
        out[name] = sorted(getattr(field.annotation, "model_fields", {}))
    return out


def did_you_mean(scenario_model: Any, section: str | None, key: str, limit: int = 3) -> list[str]:
    """Dotted keys the user may have meant by ``section.key`` (``section=None``: a top-level key).

    The same key in another section comes first (``client.rounds`` → ``run.rounds``), then keys of
    ``section`` spelled alike or beginning with it, then alike keys of the other sections.

    Examples
    --------
    >>> from fedsim.config import Scenario
    >>> did_you_mean(Scenario, "client", "rounds")
    ['run.rounds']
    >>> did_you_mean(Scenario, "run", "rouns")
    ['run.rounds']
    """
    fields = section_fields(scenario_model)
    found: list[str] = []
    if section is None:
        found += [s for s in difflib.get_close_matches(key, list(fields), n=limit, cutoff=CUTOFF)]
        found += [f"{s}.{key}" for s, names in fields.items() if key in names]
    else:
        found += [f"{s}.{key}" for s, names in fields.items() if s != section and key in names]
        found += [f"{section}.{k}" for k in difflib.get_close_matches(key, fields.get(section, []), n=limit,
                                                                      cutoff=CUTOFF)]
        if len(key) >= 4:  # a shortened key: privacy.noise → privacy.noise_multiplier
            found += [f"{section}.{k}" for k in fields.get(section, []) if k.startswith(key)]
        others = {f"{s}.{k}": k for s, names in fields.items() if s != section for k in names}
        close = difflib.get_close_matches(key, sorted(set(others.values())), n=limit, cutoff=0.8)
        found += [dotted for dotted, k in others.items() if k in close]
    return list(dict.fromkeys(found))[:limit]


def unknown_key_hint(scenario_model: Any, section: str | None, key: str) -> str:
    """The hint of an unknown-key error: what was probably meant, and the keys allowed there."""
    fields = section_fields(scenario_model)
    allowed = list(fields) if section is None else fields.get(section, [])
    guesses = did_you_mean(scenario_model, section, key)
    meant = f"did you mean {' or '.join(f'`{g}`' for g in guesses)}? " if guesses else ""
    return f"{meant}allowed keys here: {', '.join(allowed)}"


def to_config_error(err: Any, scenario_model: Any) -> ConfigError:
    """The first problem of a pydantic ``ValidationError`` as a :class:`ConfigError` naming the dotted key."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "scenario"
    if first["type"] == "extra_forbidden":
        section = str(loc[0]) if len(loc) == 2 else None
        if len(loc) <= 2:
            return ConfigError(key, "unknown key", unknown_key_hint(scenario_model, section, str(loc[-1])))
        return ConfigError(key, "unknown key", "remove it (see the scenario reference in README.md)")
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if first["type"] not in ("value_error", "missing") and not isinstance(got, dict):
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in repr(got))
        msg = f"{msg} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    more = len(err.errors()) - 1
    return ConfigError(key, msg, f"fix this key in the scenario or with --set {key}=VALUE"
                       + (f"; {more} more problem(s) after this one" if more else ""))


# ------------------------------------------------------------------------ privacy settings
_EVERY_MECHANISM = ("noise_multiplier", "target_epsilon", "clip_norm", "delta", "max_epsilon", "release_counters",
                    "counter", "counter_noise", "secure_rng")
#: the ``[privacy]`` settings each mechanism reads (``mechanism`` aside); any other one left at its default
PRIVACY_SETTINGS_READ: dict[str, tuple[str, ...]] = {
    "none": (),
    "dp-sgd": (*_EVERY_MECHANISM, "accountant", "sample_rate"),
    "dp-fedavg": (*_EVERY_MECHANISM, "accountant", "client_sampling", "clipping", "adaptive_clipping",
                  "target_quantile", "clip_lr", "count_noise"),
    "dp-ftrl": (*_EVERY_MECHANISM, "ftrl_restart_every"),  # ρ-zCDP of the tree: no accountant choice
}
_ADAPTIVE_ONLY = ("target_quantile", "clip_lr", "count_noise")
_COUNTERS_ONLY = ("counter", "counter_noise")


def pld_noise_too_small(privacy: Any) -> tuple[str, str, str] | None:
    """``(key, why, fix)`` when ``privacy.accountant = "pld"`` is asked to account a noise multiplier below
    :data:`fedsim.privacy.bounds.PLD_MIN_NOISE` (its loss grid would take minutes and gigabytes), else ``None``."""
    from fedsim.privacy.bounds import PLD_MIN_NOISE

    if privacy.accountant == "pld" and 0 < privacy.noise_multiplier < PLD_MIN_NOISE:
        return ("privacy.noise_multiplier", f"{privacy.noise_multiplier:g} is below {PLD_MIN_NOISE:g}, where the PLD "
                "accountant's loss grid needs minutes and gigabytes (fedsim.privacy.bounds)",
                f"use privacy.accountant = \"rdp\" for such noise, or a noise multiplier >= {PLD_MIN_NOISE:g}")
    return None


def privacy_setting_without_effect(privacy: Any) -> tuple[str, str, str] | None:
    """``(key, why, fix)`` of the first ``[privacy]`` setting changed from its default that the run would
    never read with this ``mechanism`` (and ``adaptive_clipping`` / ``release_counters``), else ``None``."""
    read = set(PRIVACY_SETTINGS_READ[privacy.mechanism])
    if not privacy.adaptive_clipping:
        read -= set(_ADAPTIVE_ONLY)
    if not privacy.release_counters:
        read -= set(_COUNTERS_ONLY)
    for name, field in type(privacy).model_fields.items():
        if name == "mechanism" or name in read or getattr(privacy, name) == field.default:
            continue
        if privacy.mechanism == "none":
            why = "has no effect without a mechanism (privacy.mechanism = \"none\"): nothing adds noise, " \
                  "clips, samples privately or checks a budget"
            fix = f"choose a privacy.mechanism (dp-sgd, dp-fedavg, dp-ftrl) or remove privacy.{name}"
        elif name in _ADAPTIVE_ONLY and name in PRIVACY_SETTINGS_READ[privacy.mechanism]:
            why, fix = "is read only by adaptive clipping, which is off", \
                f"set privacy.adaptive_clipping = true or remove privacy.{name}"
        elif name in _COUNTERS_ONLY:
            why, fix = "configures the released counters, which are off (privacy.release_counters = false)", \
                f"set privacy.release_counters = true or remove privacy.{name}"
        else:
            users = sorted(m for m, keys in PRIVACY_SETTINGS_READ.items() if name in keys)
            why = f"has no effect with privacy.mechanism = \"{privacy.mechanism}\" (read only by {', '.join(users)})"
            fix = f"remove privacy.{name}"
        return f"privacy.{name}", f"{why}, so {getattr(privacy, name)!r} would be ignored", fix
    return None
