"""Switching a registered name with an override drops the options that belonged to the old one.

A scenario's ``[strategy]`` table holds ``name`` plus that strategy's own options, and
``[data.partition]`` holds the options of ``data.partitioner``. ``--set strategy.name=fedavg`` on a
FedLD scenario means "this scenario with FedAvg", so FedLD's ``kappa`` and ``lam`` cannot follow
(FedAvg would refuse them as unknown options); the same holds for a ``--grid`` entry that switches
the strategy or the partitioner of a sweep. The dropped keys are the old name's options that no
override sets again; the common keys (``strategy.fraction_train`` …) stay. What was dropped is
logged, and the run's ``config.toml`` holds the table that actually ran.
"""

from __future__ import annotations

import logging
from typing import Any

#: (section path, the key naming the registered object, the table of its options or None = the
#: section itself, keys of that table that are common to every name)
SWITCHES: tuple[tuple[tuple[str, ...], str, str | None, frozenset[str]], ...] = (
    (("strategy",), "name", None, frozenset({"name", "fraction_train", "min_train_clients", "fraction_evaluate"})),
    (("data",), "partitioner", "partition", frozenset()),
)

_LOG = logging.getLogger("flwr")


def _table(raw: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = raw
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def drop_switched_options(original: dict[str, Any], result: dict[str, Any], set_keys: set[str]) -> list[str]:
    """Remove from ``result`` the options of a name that an override switched; returns their dotted keys.

    ``original``: the scenario before overrides; ``result``: after them (changed in place);
    ``set_keys``: the dotted keys the overrides set.
    """
    dropped: list[str] = []
    for path, name_key, options_key, common in SWITCHES:
        before, after = _table(original, path), _table(result, path)
        if before is None or after is None or name_key not in before or after.get(name_key) == before[name_key]:
            continue
        prefix = ".".join(path)
        old = before if options_key is None else before.get(options_key)
        table = after if options_key is None else after.get(options_key)
        if not isinstance(old, dict) or not isinstance(table, dict):
            continue
        where = prefix if options_key is None else f"{prefix}.{options_key}"
        here = [f"{where}.{key}" for key in old if key in table and key not in common]
        here = [d for d in here if d not in set_keys and not any(k.startswith(d + ".") for k in set_keys)]
        for dotted in here:
            del table[dotted.rsplit(".", 1)[1]]
        if here:
            _LOG.info("fedsim: %s.%s switched from %r to %r: dropped the options of %r (%s)", prefix, name_key,
                      before[name_key], after.get(name_key), before[name_key], ", ".join(here))
        dropped += here
    return dropped
