"""Name → object registries for strategies, plugins, partitioners, datasets, models, accountants.

Lowercase names; a duplicate registration raises unless ``force=True``; an unknown name raises
:class:`~fedsim.errors.UnknownNameError` listing the valid names and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedsim.errors import FedSimError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories of one kind (e.g. ``"strategy"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *, force: bool = False) -> Callable[[T], T]:
        """Decorator: ``@STRATEGIES.register("fedavg")``."""
        key = name.lower()

        def deco(obj: T) -> T:
            if key in self._items and not force and self._items[key] is not obj:
                raise FedSimError(
                    f"{self.kind} '{key}' is already registered",
                    "pick another name or pass force=True to replace it",
                )
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str, *, key: str | None = None) -> T:
        """Return the object registered as ``name`` or raise a typed error naming ``key``."""
        low = str(name).lower()
        if low in self._items:
            return self._items[low]
        close = difflib.get_close_matches(low, list(self._items), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UnknownNameError(
            key or self.kind,
            f"unknown {self.kind} '{name}'; allowed: {', '.join(sorted(self._items))}",
            hint + f"run `fedsim list` to see every registered {self.kind}",
        )

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())
