"""Shared machinery for plugins that look at a model as a function of its parameters.

Built once on ``torch.func`` and reused by the techniques of ``../shared/specs/client-plugins.md`` §C:

* :func:`snapshot` / :func:`call_with` — a parameter snapshot (detached copies, no second module) and
  a forward pass through it with :func:`torch.func.functional_call` (stale parameters for ConAdv,
  an EMA or distillation teacher, distances to the global model);
* :func:`per_sample_grads` — per-example gradients by ``vmap(grad(loss))``, chunked so that one
  chunk's gradients fit a memory budget (AdAdaGrad's tests, GraNd, gradient noise diagnostics, spectra);
* :func:`hvp` and :func:`ggn_vp` — Hessian- and generalised-Gauss-Newton-vector products by
  forward-over-reverse differentiation (Hessian probes, Newton-type steps).

All functions take a module and evaluate it at the given parameters without changing it. Models
with BatchNorm must be in ``eval`` mode for per-sample gradients (a per-example batch statistic is
undefined); :func:`per_sample_grads` refuses otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: default memory one chunk of per-sample gradients may take
PER_SAMPLE_BYTES = 64 * 2**20


def params_of(model: nn.Module) -> Params:
    """The model's trainable parameters by name (the live tensors, not copies)."""
    return {k: v for k, v in model.named_parameters() if v.requires_grad}


def snapshot(model: nn.Module, *, buffers: bool = False) -> Params:
    """Detached copies of the trainable parameters (and, with ``buffers``, of the buffers)."""
    out = {k: v.detach().clone() for k, v in params_of(model).items()}
    if buffers:
        out.update({k: v.detach().clone() for k, v in model.named_buffers()})
    return out


def call_with(model: nn.Module, params: Mapping[str, torch.Tensor], *args, **kwargs):
    """``model(*args)`` evaluated at ``params`` (missing names keep the module's own tensors)."""
    return functional_call(model, dict(params), args, kwargs, strict=False)


def flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All tensors of a dict flattened into one vector, in the dict's order."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None = None,
                     params: Params | None = None, max_bytes: int = PER_SAMPLE_BYTES) -> Params:
    """Gradient of the loss of every example separately: ``{name: tensor [B, *param.shape]}``.

    Parameters
    ----------
    model : the module (evaluated at ``params``; its own parameters are not changed)
    x, y : a batch of ``B`` inputs and targets
    loss_fn : the per-example loss ``loss_fn(outputs [1, ...], target [1])`` (cross-entropy by default)
    params : where to evaluate (default: the model's trainable parameters)
    max_bytes : memory one chunk of gradients may take; the batch is processed in chunks

    Raises
    ------
    ValueError : the model has BatchNorm in training mode (per-example statistics are undefined)
    """
    _check_no_train_batchnorm(model)
    loss_fn = loss_fn or nn.functional.cross_entropy
    params = {k: v.detach() for k, v in (params if params is not None else params_of(model)).items()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_example = sum(v.numel() for v in params.values()) * 4
    chunk = max(1, int(max_bytes // max(per_example, 1)))
    fn = vmap(grad(one), in_dims=(None, 0, 0))
    parts = [fn(params, x[s:s + chunk], y[s:s + chunk]) for s in range(0, int(x.shape[0]), chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in params}


def batch_loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  loss_fn: LossFn | None = None) -> Callable[[Params], torch.Tensor]:
    """``params -> mean loss of the batch`` (buffers fixed), the function the products below differentiate."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    return lambda p: loss_fn(functional_call(model, (p, buffers), (x,)), y)


def hvp(f: Callable[[Params], torch.Tensor], params: Params, v: Params) -> Params:
    """Hessian-vector product ``∇²f(params) · v`` (forward-over-reverse: ``jvp`` of ``grad``)."""
    primals = {k: t.detach() for k, t in params.items()}
    return jvp(grad(f), (primals,), (dict(v),))[1]


def ggn_vp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: Params, v: Params,
           loss_fn: LossFn | None = None) -> Params:
    """Generalised Gauss-Newton-vector product ``Jᵀ H_L J v`` (J: Jacobian of the outputs in the
    parameters, H_L: Hessian of the loss in the outputs), positive semi-definite for convex losses."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    buffers = {k: t.detach() for k, t in model.named_buffers()}
    primals = {k: t.detach() for k, t in params.items()}

    def outputs(p: Params) -> torch.Tensor:
        return functional_call(model, (p, buffers), (x,))

    z, jv = jvp(outputs, (primals,), (dict(v),))
    hjv = jvp(grad(lambda out: loss_fn(out, y)), (z.detach(),), (jv,))[1]
    _, pull = vjp(outputs, primals)
    return pull(hjv)[0]


def _check_no_train_batchnorm(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"per-sample gradients of module '{name}' ({type(m).__name__}) in training mode are "
                             "undefined (batch statistics); call model.eval() for the pass, or use GroupNorm")
