"""Penultimate features and the classifier of a model, shared by ``distill``, ``slca`` and ``barlow_twins``.

A model's *classifier* is its last :class:`torch.nn.Linear` (in module order); its *features* are the
classifier's input (the penultimate representation). Both are found without knowing the architecture,
so the helpers work on every built-in model (logreg, MLP, CNN) and on user models whose head is a
final ``Linear``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedsim.clients.functional import call_with

__all__ = ["classifier_of", "features_and_logits"]


def classifier_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the model's last ``nn.Linear``; ``ValueError`` when it has none."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to take penultimate features from")
    return found[-1]


def features_and_logits(model: nn.Module, x: torch.Tensor,
                        params: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of one forward pass: the classifier's input and the model's output.

    With ``params`` the pass is evaluated at those parameters (:func:`call_with`, no module copy).
    """
    _, head = classifier_of(model)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    try:
        logits = model(x) if params is None else call_with(model, params, x)
    finally:
        hook.remove()
    return seen[-1].flatten(1), logits
