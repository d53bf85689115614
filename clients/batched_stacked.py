"""Stacked local steps for sequential linear models, without ``torch.func`` (used by ``clients/batched.py``).

The vectorised path (:mod:`fedsim.clients.batched`) trains many clients at once. For the models it
batches by default on CPU — fedsim's ``mlp`` and ``logreg``: ``nn.Sequential`` of ``Flatten``,
``Linear`` and activations — this module does the same step with plain autograd:

* each ``Linear`` leaf's parameters are stacked along a leading client dimension (``[C, out, in]``,
  ``[C, out]``) and the layer runs as one ``torch.baddbmm`` over the clients;
* parameter-free elementwise modules (:data:`ELEMENTWISE`) run unchanged on the ``[C, B, …]``
  activations, and ``Flatten`` runs with its dimensions shifted by one for the client dimension;
* the loss is each client's mean cross-entropy over its batch's real samples (padding masked), and
  one backward pass of the *sum* of the clients' losses gives every client its own gradient: the
  clients share no parameter, so the summed loss's gradient with respect to client ``c``'s stacked
  slice is exactly the gradient of client ``c``'s loss.

Why not ``torch.vmap``: the first ``torch.func`` call imports ``torch._dynamo`` (≈800 modules, seconds
of round 1), and every vmapped step pays functorch's dispatch. The stacked form needs neither; it is
only taken for models :func:`stacked_plan` has verified layer by layer (exact module types, no
hooks), anything else keeps the ``vmap`` path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: parameter-free modules that act elementwise, so they run unchanged with a leading client dimension
#: (exact types: a subclass may override ``forward``)
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardtanh, nn.Hardsigmoid,
    nn.Hardswish,
)

Layer = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _leaves(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> str | None:
    """Flatten (possibly nested) plain ``nn.Sequential`` containers into ``out``; a reason if not possible."""
    if _hooked(module):
        return f"module '{prefix or 'model'}' has hooks"
    if type(module) is nn.Sequential:
        for name, child in module.named_children():
            why = _leaves(child, f"{prefix}.{name}" if prefix else name, out)
            if why is not None:
                return why
        return None
    out.append((prefix, module))
    return None


def _linear(wi: int, bi: int | None) -> Layer:
    def run(ps: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        w = ps[wi]  # [C, out, in]
        lead = h.shape[1:-1]
        h3 = h.reshape(h.shape[0], -1, h.shape[-1])
        if bi is None:
            o = torch.bmm(h3, w.transpose(1, 2))
        else:
            o = torch.baddbmm(ps[bi].unsqueeze(1), h3, w.transpose(1, 2))
        return o.reshape(h.shape[0], *lead, w.shape[1])
    return run


def _module(m: nn.Module) -> Layer:
    return lambda ps, h: m(h)


def _flatten(m: nn.Flatten) -> Layer | str:
    start, end = m.start_dim, m.end_dim
    if start < 1 or (end >= 0 and end < start):  # a negative start may reach the batch dimension
        return f"Flatten(start_dim={start}, end_dim={end}) may merge the batch dimension"
    shifted = nn.Flatten(start + 1, end + 1 if end >= 0 else end)
    return lambda ps, h: shifted(h)


def stacked_plan(model: nn.Module) -> tuple[list[Layer] | None, str | None]:
    """The model as layers over stacked parameters, or ``(None, why not)``.

    A layer is called as ``layer(ps, h)`` where ``ps[i]`` is the ``i``-th parameter of
    ``model.named_parameters()`` with a leading client dimension and ``h`` the activations ``[C, B, …]``.
    Accepted: a (possibly nested) plain ``nn.Sequential`` whose leaves are exact ``nn.Linear``,
    :data:`ELEMENTWISE` modules or ``nn.Flatten`` (not over the batch dimension), none with hooks or
    buffers, so that the model's parameters are exactly its Linear layers' ``weight`` and ``bias``.
    """
    leaves: list[tuple[str, nn.Module]] = []
    why = _leaves(model, "", leaves)
    if why is not None:
        return None, why
    index = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    layers: list[Layer] = []
    used: set[int] = set()
    for name, m in leaves:
        own = list(m.parameters())
        if any(True for _ in m.buffers()):
            return None, f"module '{name}' has buffers"
        if type(m) is nn.Linear:
            if [k for k, _ in m.named_parameters()] != (["weight"] if m.bias is None else ["weight", "bias"]):
                return None, f"Linear '{name}' has parameters other than weight and bias"
            layers.append(_linear(index[id(m.weight)], None if m.bias is None else index[id(m.bias)]))
        elif own:
            return None, f"module '{name}' ({type(m).__name__}) has parameters and is not nn.Linear"
        elif type(m) is nn.Flatten:
            layer = _flatten(m)
            if isinstance(layer, str):
                return None, layer
            layers.append(layer)
        elif type(m) in ELEMENTWISE:
            layers.append(_module(m))
        else:
            return None, f"module '{name}' ({type(m).__name__}) is not a verified elementwise module"
        used.update(index[id(p)] for p in own)
    if used != set(index.values()):
        return None, "the model's parameters are not exactly those of its Linear layers"
    return layers, None


def stacked_step(layers: list[Layer], ps: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                 mask: torch.Tensor, cnt: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-client gradients, losses and logits of one step.

    ``ps``: the active clients' stacked parameters ``[k, …]``; ``xb`` ``[k, B, …]`` and ``yb`` ``[k, B]``
    the gathered batch; ``mask`` ``[k, B]`` (float) marks real samples and ``cnt`` ``[k]`` their number.
    Returns ``(grads, loss [k], logits [k, B, classes])`` with ``loss[c] = Σ_b ce[c, b]·mask[c, b] / cnt[c]``.
    """
    leaves = [p.detach().requires_grad_() for p in ps]
    h = xb
    with torch.enable_grad():
        for layer in layers:
            h = layer(leaves, h)
        if h.dim() != 3 or h.shape[:2] != yb.shape:
            raise ValueError(f"the model's output per client has shape {tuple(h.shape[1:])}, "
                             f"expected (batch, classes) = ({yb.shape[1]}, classes)")
        k, b, classes = h.shape
        ce = nn.functional.cross_entropy(h.reshape(k * b, classes), yb.reshape(k * b), reduction="none")
        loss = (ce.view(k, b) * mask).sum(1) / cnt
        grads = torch.autograd.grad(loss.sum(), leaves)
    return list(grads), loss.detach(), h.detach()


__all__ = ["ELEMENTWISE", "stacked_plan", "stacked_step"]
