"""Optax-style gradient transforms on dicts of torch tensors, composed with :func:`chain`.

A :class:`GradTransform` is a pair of functions, ``init(params) -> state`` and
``update(grads, state, params, **extra) -> (directions, state)``, over dicts keyed by parameter name
(the anchor is Optax's ``GradientTransformation`` in ``optax/_src/base.py``, with ``chain`` from
``optax/_src/combine.py``; see ``client-plugins.md`` §A). The ``step`` client plugin
(:mod:`fedsim.clients.plugins.step`) builds the chain a scenario lists and applies it.

Sign convention
---------------
Transforms map gradients to a **descent direction** ``d`` (same sign as the gradient), and the
``step`` plugin applies ``p ← p − η·d`` with ``p.add_(d, alpha=-η)``, ``η = client.lr`` — the very
operation ``torch.optim.SGD`` performs, so the chain ``["sgd"]`` reproduces the plain loop bit for bit
(scaling by ``−η`` inside a transform and adding would round differently where the CPU fuses the
multiply-add). A transform that chooses its own step length (``gns_newton``) sets
``sets_step_size``; its direction is then ``−Δ`` and the plugin uses ``η = 1``.

State
-----
A transform's state is a nested ``dict[str, Tensor | dict]`` (scalars as 0-d tensors), so the plugin
can persist it per client in Flower's ``context.state`` (:func:`flatten_state` /
:func:`unflatten_state`). Transforms receive extra keyword arguments from the plugin:
``loss`` (the batch loss, detached) and ``loss_at`` (``params -> batch loss``, a closure for
transforms that re-evaluate the batch at trial points); they ignore what they do not use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedsim.errors import ConfigError
from fedsim.options import build_options
from fedsim.registry import Registry

Params = dict[str, torch.Tensor]
State = dict[str, Any]

__all__ = ["GradTransform", "Chain", "chain", "TRANSFORMS", "register_transform", "build_chain",
           "flatten_state", "unflatten_state", "zeros_like_dict", "global_norm"]


class GradTransform:
    """Base class of gradient transforms (Optax's ``GradientTransformation`` as a class).

    Class variables
    ---------------
    name : registry name
    sets_step_size : the output is ``−Δ`` for a step ``Δ`` the transform chose itself; the plugin then
        applies it with ``η = 1`` instead of ``client.lr``
    needs_closure : ``update`` needs ``loss_at`` (re-evaluates the batch loss at other parameters)
    Settings : frozen dataclass of settings, validated where the scenario is read
    """

    name: ClassVar[str] = ""
    sets_step_size: ClassVar[bool] = False
    needs_closure: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Settings:
        pass

    def __init__(self, settings: Any | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()

    def init(self, params: Params) -> State:
        """The initial state for ``params`` (detached tensors keyed by name)."""
        return {}

    def update(self, grads: Params, state: State, params: Params, **extra: Any) -> tuple[Params, State]:
        """Directions for ``grads`` (a subset of ``params``' names) and the new state."""
        raise NotImplementedError

    def metrics(self, state: State) -> dict[str, float]:
        """Numbers worth reporting at the end of a round (``step/<name>.<key>``)."""
        return {}

    def preflight(self, scenario: Any, key: str) -> None:
        """Refuse, before the run, a scenario this transform cannot honour (``key`` names it)."""
        return None


class Chain(GradTransform):
    """Transforms applied one after another; the state is ``{"0": state_0, "1": state_1, ...}``."""

    name = "chain"

    def __init__(self, transforms: Sequence[GradTransform]) -> None:
        super().__init__()
        self.transforms = list(transforms)
        self.sets_step_size = any(t.sets_step_size for t in self.transforms)  # type: ignore[misc]
        self.needs_closure = any(t.needs_closure for t in self.transforms)  # type: ignore[misc]

    def init(self, params: Params) -> State:
        return {str(i): t.init(params) for i, t in enumerate(self.transforms)}

    def update(self, grads: Params, state: State, params: Params, **extra: Any) -> tuple[Params, State]:
        new: State = {}
        for i, t in enumerate(self.transforms):
            grads, new[str(i)] = t.update(grads, state[str(i)], params, **extra)
        return grads, new

    def metrics(self, state: State) -> dict[str, float]:
        out: dict[str, float] = {}
        names = [t.name for t in self.transforms]
        for i, t in enumerate(self.transforms):
            label = t.name if names.count(t.name) == 1 else f"{t.name}{i}"  # the same transform twice: by position
            out.update({f"{label}.{k}": v for k, v in t.metrics(state[str(i)]).items()})
        return out


def chain(*transforms: GradTransform) -> Chain:
    """Compose transforms: ``chain(a, b).update(g) == b.update(a.update(g))`` (Optax's ``chain``)."""
    return Chain(transforms)


#: every transform by name; complete once `fedsim.clients.plugins` (or `fedsim.catalog.registries()`) is imported
TRANSFORMS: Registry = Registry("transform", base=GradTransform)


def register_transform(cls: type[GradTransform]) -> type[GradTransform]:
    """Class decorator registering a transform under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty class attribute 'name'")
    return TRANSFORMS.register(cls.name)(cls)


def build_chain(items: Sequence[Any], key: str) -> Chain:
    """The chain a scenario lists: each item a transform name or a table ``{name = ..., <settings>}``.

    Errors name ``<key>[i]`` (or ``<key>[i].<setting>``). A chain that holds a transform choosing its own
    step length (``sets_step_size``) must end with it: a transform after it would rescale a step
    that was accepted by a line search.
    """
    if not items:
        raise ConfigError(key, "the chain is empty", 'list at least one transform, e.g. ["sgd"]')
    made = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, dict):
            options = dict(item)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise ConfigError(f"{where}.name", "a transform table needs a name",
                                  f'write {{name = "frugal", ...}}; transforms: {", ".join(TRANSFORMS.names())}')
        else:
            raise ConfigError(where, f"expected a transform name or a table, got {item!r}",
                              'e.g. "sgd" or {name = "frugal", density = 0.25}')
        cls = TRANSFORMS.get(name, key=where)
        made.append(cls(build_options(cls.Settings, options, where)))
    for i, t in enumerate(made[:-1]):
        if t.sets_step_size:
            raise ConfigError(f"{key}[{i}]", f"'{t.name}' chooses its own step length, so it must be the last "
                              "transform of the chain", f"move '{t.name}' to the end of {key}")
    return Chain(made)


# -- state persistence --------------------------------------------------------------------------------

def flatten_state(state: State, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested state → ``{"a/b/name": tensor}`` (parameter names contain dots, never slashes)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_state(v, path + "/"))
        elif isinstance(v, torch.Tensor):
            out[path] = v
        else:
            raise TypeError(f"transform state '{path}' must be a tensor or a dict, got {type(v).__name__}")
    return out


def unflatten_state(flat: dict[str, Any], device: torch.device | str = "cpu") -> State:
    """Inverse of :func:`flatten_state` (NumPy arrays are turned into tensors on ``device``)."""
    out: State = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = torch.as_tensor(v).to(device)
    return out


def zeros_like_dict(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


def global_norm(tensors: Params) -> torch.Tensor:
    """ℓ2 norm of all tensors together."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors.values()]))


def _map(fn: Callable[[str, torch.Tensor], torch.Tensor], grads: Params) -> Params:
    return {k: fn(k, g) for k, g in grads.items()}


# -- basic transforms ---------------------------------------------------------------------------------

@register_transform
class SGD(GradTransform):
    """The identity: the direction is the gradient, so the step is plain SGD ``p ← p − η g``."""

    name = "sgd"

    def update(self, grads, state, params, **extra):
        return grads, state


@register_transform
class Scale(GradTransform):
    """Multiply the direction by ``factor`` (a per-chain learning-rate multiplier)."""

    name = "scale"

    @dataclass(frozen=True)
    class Settings:
        factor: float = 1.0

        def __post_init__(self) -> None:
            if not self.factor > 0:
                raise ValueError(f"factor must be > 0, got {self.factor}")

    def update(self, grads, state, params, **extra):
        return _map(lambda _, g: g * self.settings.factor, grads), state


@register_transform
class Momentum(GradTransform):
    """Heavy-ball momentum as ``torch.optim.SGD`` writes it: ``b ← μ b + g``, direction ``b``
    (Nesterov: ``g + μ b``). Polyak (1964); Sutskever et al. (2013) for the Nesterov form."""

    name = "momentum"

    @dataclass(frozen=True)
    class Settings:
        beta: float = 0.9
        nesterov: bool = False

        def __post_init__(self) -> None:
            if not 0.0 <= self.beta < 1.0:
                raise ValueError(f"beta must be in [0, 1), got {self.beta}")

    def init(self, params):
        return {"buf": zeros_like_dict(params)}

    def update(self, grads, state, params, **extra):
        beta, buf = self.settings.beta, dict(state["buf"])
        for k, g in grads.items():
            buf[k] = buf[k] * beta + g
        out = {k: g + beta * buf[k] for k, g in grads.items()} if self.settings.nesterov else \
            {k: buf[k] for k in grads}
        return out, {"buf": buf}


def adam_direction(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, b1: float, b2: float,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam moment update (Kingma & Ba, 2015): ``(m̂ / (√v̂ + ε), m, v)`` at step ``t`` (1-based)."""
    m = m * b1 + g * (1 - b1)
    v = v * b2 + g * g * (1 - b2)
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return m_hat / (v_hat.sqrt() + eps), m, v


@dataclass(frozen=True)
class AdamSettings:
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


@register_transform
class Adam(GradTransform):
    """Adam's scaling (Optax ``scale_by_adam``): bias-corrected ``m̂ / (√v̂ + ε)``; with ``client.lr``
    it is ``torch.optim.Adam``. Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015."""

    name = "adam"
    Settings = AdamSettings

    def init(self, params):
        return {"count": torch.zeros((), dtype=torch.int64), "m": zeros_like_dict(params),
                "v": zeros_like_dict(params)}

    def update(self, grads, state, params, **extra):
        s, t = self.settings, int(state["count"]) + 1
        m, v, out = dict(state["m"]), dict(state["v"]), {}
        for k, g in grads.items():
            out[k], m[k], v[k] = adam_direction(g, m[k], v[k], t, s.b1, s.b2, s.eps)
        return out, {"count": torch.tensor(t, dtype=torch.int64), "m": m, "v": v}


@register_transform
class Sign(GradTransform):
    """``sign(g)`` per coordinate (signSGD; Bernstein et al., ICML 2018)."""

    name = "sign"

    def update(self, grads, state, params, **extra):
        return _map(lambda _, g: torch.sign(g), grads), state


@register_transform
class ClipByNorm(GradTransform):
    """Rescale all directions together so their global ℓ2 norm is at most ``max_norm``
    (Optax ``clip_by_global_norm``: ``g · max_norm / max(‖g‖, max_norm)``; Pascanu et al., 2013)."""

    name = "clip_by_norm"

    @dataclass(frozen=True)
    class Settings:
        max_norm: float = 1.0

        def __post_init__(self) -> None:
            if not self.max_norm > 0:
                raise ValueError(f"max_norm must be > 0, got {self.max_norm}")

    def update(self, grads, state, params, **extra):
        norm = global_norm(grads)
        if float(norm) <= self.settings.max_norm:
            return grads, state
        factor = self.settings.max_norm / norm
        return _map(lambda _, g: g * factor, grads), state


@register_transform
class WeightDecay(GradTransform):
    """Add ``rate · p`` to the direction (Optax ``add_decayed_weights``); after ``adam`` this is AdamW's
    decoupled decay (Loshchilov & Hutter, ICLR 2019), before it, L2 regularisation."""

    name = "weight_decay"

    @dataclass(frozen=True)
    class Settings:
        rate: float = 1e-4

        def __post_init__(self) -> None:
            if not self.rate >= 0:
                raise ValueError(f"rate must be >= 0, got {self.rate}")

    def update(self, grads, state, params, **extra):
        return _map(lambda k, g: g + self.settings.rate * params[k], grads), state
