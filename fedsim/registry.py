"""Name → object registries for strategies, plugins, partitioners, datasets, models, accountants.

Lowercase names; a duplicate registration raises unless ``force=True``; an unknown name raises
:class:`~fedsim.errors.UnknownNameError` listing the valid names and the closest match.

Extensions outside the package are reached in two more ways, in any process that looks a name up
(the server, a Ray actor, a SuperNode's ClientApp):

* ``module:object`` names (``"my_pkg.rules:MyRule"``, case kept): the module is imported, the object
  checked to be of the registry's kind (:attr:`Registry.base`, or :attr:`Registry.adopt`, which may
  also wrap it) and remembered under that name (never listed by :meth:`Registry.names`);
* Python entry points of the group ``fedsim.<kind>s`` (``fedsim.strategies``, ``fedsim.plugins``,
  ``fedsim.models``, ``fedsim.datasets``, ``fedsim.partitioners``): each is registered under the entry
  point's name the first time a name is not found (or when ``fedsim.catalog`` fills every registry).
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, Generic, TypeVar

from fedsim.errors import ConfigError, FedSimError, UnknownNameError

T = TypeVar("T")

#: ``package.module:Object.attr`` (the object part may be dotted)
_OBJECT_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
#: entry point group of each kind that extensions may add to
ENTRY_POINT_GROUPS = {"strategy": "fedsim.strategies", "plugin": "fedsim.plugins", "model": "fedsim.models",
                      "dataset": "fedsim.datasets", "partitioner": "fedsim.partitioners"}
#: ``flwr:Name`` is shorthand for Flower's own strategies, ``flwr.serverapp.strategy.Name``
FLOWER_STRATEGIES = "flwr.serverapp.strategy"


class Registry(Generic[T]):
    """A named collection of factories of one kind (e.g. ``"strategy"``).

    Parameters
    ----------
    kind
        What the registry holds, used in messages and for the entry point group.
    base
        If given, a ``module:object`` name must name a subclass of it.
    """

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        #: ``adopt(name, obj) -> item``: turns an imported object into this registry's item (checks,
        #: wraps) or raises ``TypeError`` saying why it is not one; set by the registry's owner
        self.adopt: Callable[[str, Any], T] | None = None
        self._items: dict[str, T] = {}
        self._resolved: dict[str, T] = {}
        self._entry_points_loaded = False

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

    def discard(self, name: str) -> None:
        """Forget ``name`` (a definition being replaced by its new version, e.g. a re-run notebook cell)."""
        self._items.pop(name.lower(), None)

    def get(self, name: str, *, key: str | None = None) -> T:
        """Return the object registered as ``name`` (or named ``module:object``), else raise a
        typed error naming ``key``."""
        text = str(name)
        extensible = self.kind in ENTRY_POINT_GROUPS
        if ":" in text and extensible:
            return self._get_object(text, key or self.kind)
        low = text.lower()
        if low not in self._items:
            self.load_entry_points()
        if low in self._items:
            return self._items[low]
        close = difflib.get_close_matches(low, list(self._items), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UnknownNameError(
            key or self.kind,
            f"unknown {self.kind} '{name}'; allowed: {', '.join(sorted(self._items))}",
            hint + f"run `fedsim list` to see every registered {self.kind}"
            + (", or name your own as 'module:object'" if extensible else ""),
        )

    # ------------------------------------------------------------------ extensions
    def _get_object(self, name: str, key: str) -> T:
        if name in self._resolved:
            return self._resolved[name]
        obj = import_object(name, key, FLOWER_STRATEGIES if self.kind == "strategy" else None)
        item = self._accept(name, obj, key)
        self._resolved[name] = item
        return item

    def _accept(self, name: str, obj: Any, key: str) -> T:
        """``obj`` as an item of this registry (already registered, adopted or a ``base`` subclass)."""
        if any(obj is item for item in self._items.values()):
            return obj
        what = f"'{name}' is {_describe(obj)}"
        try:
            if self.adopt is not None:
                before = dict(self._items)
                try:
                    return self.adopt(name, obj)
                finally:  # an adopter that registers (to wrap) must not list the name
                    self._items.clear()
                    self._items.update(before)
            if self.base is not None:
                if isinstance(obj, type) and issubclass(obj, self.base):
                    if not getattr(obj, "name", "x"):
                        raise TypeError(f"{obj.__qualname__} needs a non-empty class attribute 'name'")
                    return obj  # type: ignore[return-value]
                raise TypeError(f"a {self.kind} must be a subclass of {self.base.__qualname__}")
            if callable(obj) and not isinstance(obj, ModuleType):
                return obj  # type: ignore[return-value]
            raise TypeError(f"a {self.kind} must be callable")
        except TypeError as err:
            raise ConfigError(key, f"{what}, not a {self.kind}: {err}",
                              f"name a {self.kind} as 'module:object' (see README, Python API)") from None

    def load_entry_points(self) -> None:
        """Register the entry points of this kind's group (once; see the module docstring)."""
        group = ENTRY_POINT_GROUPS.get(self.kind)
        if self._entry_points_loaded or group is None:
            return
        self._entry_points_loaded = True  # set first: an entry point's import may look names up
        try:
            self._load_group(group)
        except BaseException:
            self._entry_points_loaded = False  # a broken entry point fails every time, never only once
            raise

    def _load_group(self, group: str) -> None:
        from importlib.metadata import entry_points

        for ep in entry_points(group=group):
            where = f"entry point '{ep.name} = {ep.value}' (group {group})"
            try:
                obj = ep.load()
            except Exception as err:  # noqa: BLE001 - any failure of a third-party import is reported
                raise FedSimError(f"{where} cannot be loaded: {type(err).__name__}: {err}",
                                  "fix or uninstall the package that declares it") from None
            if isinstance(obj, ModuleType):
                continue  # importing the module registered what it defines
            item = self._accept(ep.name, obj, f"entry point {ep.name}")
            if ep.name.lower() not in self._items or self._items[ep.name.lower()] is not item:
                self.register(ep.name)(item)

    # ------------------------------------------------------------------ listing
    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


def import_object(name: str, key: str, flwr_module: str | None = None) -> Any:
    """The object ``module:object`` names, imported; a typed error naming ``key`` when the name is
    malformed, the module cannot be imported or lacks the object. ``flwr:X`` means ``flwr_module:X``
    when ``flwr_module`` is given (Flower's strategies)."""
    if not _OBJECT_NAME.match(name):
        raise ConfigError(key, f"'{name}' is not a valid 'module:object' name",
                          "write it as package.module:Object, e.g. my_pkg.rules:MyRule")
    module_name, _, attr = name.partition(":")
    if module_name == "flwr" and flwr_module:
        module_name = flwr_module
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        raise ConfigError(key, f"module '{module_name}' of '{name}' cannot be imported: no module named "
                          f"'{missing}'", "install the package or put its folder on PYTHONPATH (every "
                          "process that runs clients imports it too)") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise ConfigError(key, f"module '{module_name}' of '{name}' failed to import: {type(err).__name__}: {err}",
                          "fix the module so that `python -c 'import " + module_name + "'` works") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=1)
            raise ConfigError(key, f"module '{module_name}' has no object '{attr}'",
                              (f"did you mean '{module_name}:{close[0]}'? " if close else "")
                              + "check the name after the colon")
        obj = getattr(obj, part)
    return obj


def _describe(obj: Any) -> str:
    if isinstance(obj, ModuleType):
        return "a module"
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__name__}"
