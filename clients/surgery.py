"""Module surgery for plugins: swap modules of a live model and keep the optimizer right.

Plugins such as ghost batch norm, TReLU, TrAct or ReSTE replace modules of the model the loop
trains (the idea of Composer's ``module_surgery``). Two things make that safe here:

* the optimizer already holds references to the old parameters: :func:`replace_modules` points its
  parameter groups at the new ones (a replacement that reuses the old ``Parameter`` objects needs
  nothing; new parameters are added in a group of their own, with the first group's settings);
* the model is the process's shared model (reloaded with the global weights every round), so the
  swap is undone at ``ROUND_END`` with the :class:`Undo` it returns, leaving the model as it was
  apart from the trained values of parameters and buffers that both modules share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Undo:
    """Puts the original modules back (call once, at ``ROUND_END``)."""

    model: nn.Module
    swapped: list[tuple[str, nn.Module, nn.Module]] = field(default_factory=list)
    restore: Callable[[nn.Module, nn.Module], None] | None = None

    def __call__(self) -> None:
        for name, old, new in reversed(self.swapped):
            if self.restore is not None:
                self.restore(old, new)
            _set_module(self.model, name, old)
        self.swapped.clear()


def replace_modules(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    match: Callable[[str, nn.Module], bool], make: Callable[[nn.Module], nn.Module],
                    restore: Callable[[nn.Module, nn.Module], None] | None = None) -> Undo:
    """Replace every module for which ``match(name, module)`` holds with ``make(module)``.

    Parameters
    ----------
    model : the model to operate on (in place)
    optimizer : its optimizer, whose parameter references are updated (``None``: no optimizer yet)
    match : which modules to replace (children of a replaced module are not visited)
    make : builds the replacement from the original module
    restore : ``restore(old, new)`` copies what the original must keep from the replacement when
        :class:`Undo` runs (not needed when the replacement shares the original's parameters)

    Returns
    -------
    Undo : the callable that puts the originals back
    """
    undo = Undo(model, restore=restore)
    targets = []
    for name, module in model.named_modules():
        if name and match(name, module) and not any(name.startswith(t + ".") for t, _ in targets):
            targets.append((name, module))
    for name, old in targets:
        new = make(old)
        _set_module(model, name, new)
        undo.swapped.append((name, old, new))
        if optimizer is not None:
            _retarget(optimizer, old, new)
    return undo


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _retarget(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module) -> None:
    """Point the optimizer at ``new``'s parameters where it held ``old``'s (by parameter name)."""
    old_params = dict(old.named_parameters())
    new_params = dict(new.named_parameters())
    by_id = {id(p): k for k, p in old_params.items()}
    placed: set[int] = set()
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            key = by_id.get(id(p))
            if key is None:
                continue
            q = new_params.get(key)
            if q is None:
                raise ValueError(f"the replacement of {type(old).__name__} has no parameter '{key}' for the optimizer")
            if q is not p and p in optimizer.state:
                optimizer.state[q] = optimizer.state.pop(p)
            group["params"][i] = q
            placed.add(id(q))
    extra = [q for q in new_params.values() if id(q) not in placed and q.requires_grad]
    if extra:
        settings = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group({"params": extra, **settings})
