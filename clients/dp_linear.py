"""Exact DP-SGD clipping for models whose trainable layers are all ``nn.Linear``: ghost norms, one matmul per layer.

References
----------
* Goodfellow, "Efficient Per-Example Gradient Computations", arXiv 1510.01799 (2015): a linear layer's
  per-sample weight gradient is the outer product ``δ_i a_iᵀ`` of the layer's output gradient and input, so
  its norm is ``||δ_i||·||a_i||`` without forming it.
* Li, Tramèr, Liang, Hashimoto, "Large Language Models Can Be Strong Differentially Private Learners",
  ICLR 2022 (arXiv 2110.05679): ghost clipping, per-sample norms from ``a`` and ``δ`` alone.
* Bu, Wang, Zha, Karypis, "Differentially Private Optimization on Large Model at Small Cost", ICML 2023
  (arXiv 2210.00038; "book-keeping"): keep ``a`` and ``δ`` of the one backward pass and form the clipped sum
  ``(c⊙δ)ᵀA`` from them, instead of a second backward pass.

What :class:`GhostLinear` computes, per step and for a batch of ``B`` samples (``B = 0`` included):

* the forward runs the model's layers in order (``nn.Sequential`` semantics) with every ``nn.Linear`` fed its
  **detached** parameters, keeping each trainable layer's input ``A`` (``B × in``) and output ``Z``; the loop's
  one ``loss.backward()`` then leaves ``δ = ∂loss/∂Z`` in ``Z.grad`` and computes no parameter gradient
  (the loss is a sum over samples, so row ``i`` of ``δ`` is sample ``i``'s);
* per-sample squared norms ``Σ_layers ||δ_i||²·||a_i||² (weight) + ||δ_i||² (bias)``, and Opacus's clip
  factors ``c_i = min(1, C / (||g_i|| + 1e-6))`` (``DPOptimizer.clip_and_accumulate``);
* the noise ``N(0, (σC)²)`` on every coordinate: one call of Opacus's own noise function (``_generate_noise``,
  called as ``DPOptimizer.add_noise`` calls it, secure mode included) for one flat buffer holding all the
  optimizer's parameters in its order (kept for the round, a view per parameter); onto the views ``(c⊙δ)ᵀA``
  for each weight (one ``addmm``) and ``δᵀc`` for each bias (one ``addmv``); the buffer is divided by the
  expected batch size and each parameter's ``.grad`` is its view. The noise has Opacus's distribution, independent
  coordinate by coordinate, but one draw over the buffer is not Opacus's draw parameter by parameter: a
  seed gives other noise values than in Opacus's modes (one call instead of one per parameter saves
  ≈ 30 µs a step on the MLP of ``bench/bench_dpsgd.py``).

That is Opacus's ``DPOptimizer`` update (clip, sum, noise, ``loss_reduction="mean"``) to float rounding for
the same noise, so the sampled Gaussian mechanism and its accounting are unchanged. It is exact only where
every per-sample gradient is a rank-one outer product: each ``nn.Linear`` applied once per forward to a
``(B, in)`` input, every other layer per-sample (no mixing across the batch), parameter-free and not in place.
:func:`ghost_linear_reason` checks exactly that from the module tree; anything else is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.errors import ConfigError, IncompatibleModelError

__all__ = ["PER_SAMPLE_LAYERS", "GhostLinear", "ghost_linear_reason", "optimizer_params"]

#: parameter-free layers that act on each element (or each sample) alone, so sample ``i``'s output depends only
#: on sample ``i``'s input; matched by exact type (a subclass may change the forward)
PER_SAMPLE_LAYERS = (nn.Identity, nn.Flatten, nn.Dropout, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
                     nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
                     nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters Opacus's ``DPOptimizer`` clips and noises, in its order (every group's, needing grad)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model's leaf layers in forward order (nested ``nn.Sequential`` flattened); others are leaves."""
    if type(model) is nn.Sequential:
        return [leaf for child in model for leaf in _layers(child)]
    return [model]


def ghost_linear_reason(model: nn.Module, sample_shape: Sequence[int],
                        params: Sequence[nn.Parameter] | None = None) -> str | None:
    """Why ``model`` cannot use :class:`GhostLinear` on samples of ``sample_shape`` (``None``: it can).

    It can when the model is an ``nn.Linear`` or a (nested) ``nn.Sequential`` of ``nn.Linear`` and
    :data:`PER_SAMPLE_LAYERS` (none in place, no module hooks on the ``Linear``/``Sequential`` modules it runs
    itself), every ``nn.Linear`` appears once, no parameter is shared, each ``nn.Linear`` gets a 2-D
    ``(batch, features)`` input (``Flatten`` never merging the batch dimension), and every trainable parameter
    (``params``: the optimizer's; default, every parameter needing grad) belongs to an ``nn.Linear``.
    """
    if type(model) not in (nn.Sequential, nn.Linear):
        return f"the model is a {type(model).__name__}, not an nn.Sequential (its forward cannot be checked)"
    layers = _layers(model)
    containers = [m for m in model.modules() if type(m) is nn.Sequential]
    hooked = [type(m).__name__ for m in (*containers, *layers) if type(m) in (nn.Sequential, nn.Linear)
              and any(getattr(m, h, None) for h in _HOOKS)]
    if hooked:
        return f"module hooks are registered on {hooked[0]} (its forward is run without them)"
    ndim = 1 + len(sample_shape)
    for i, m in enumerate(layers):
        where = f"layer {i} ({type(m).__name__})"
        if type(m) is nn.Linear:
            if ndim != 2:
                return f"{where} gets a {ndim}-D input; the ghost norm needs (batch, features)"
            if any(m is other for other in layers[:i]):
                return f"{where} is applied twice in one forward"
        elif type(m) not in PER_SAMPLE_LAYERS:
            return f"{where} is not an nn.Linear nor a known per-sample, parameter-free layer"
        elif next(m.parameters(recurse=False), None) is not None:
            return f"{where} holds parameters"
        elif getattr(m, "inplace", False):
            return f"{where} works in place (it would overwrite the Linear output whose gradient is kept)"
        elif type(m) is nn.Flatten:
            start, end = (d + ndim if d < 0 else d for d in (m.start_dim, m.end_dim))
            if start < 1:
                return f"{where} flattens the batch dimension"
            ndim -= max(end - start, 0)
    owned = [p for m in layers if type(m) is nn.Linear for p in m.parameters(recurse=False)]
    if len({id(p) for p in owned}) != len(owned):
        return "a parameter is shared between nn.Linear layers"
    trainable = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return "the model has no trainable parameter"
    if len({(p.device, p.dtype) for p in trainable}) > 1:
        return "the trainable parameters differ in device or dtype (the noise is one flat buffer)"
    if not {id(p) for p in trainable} <= {id(p) for p in owned}:
        return "a trainable parameter does not belong to an nn.Linear"
    return None


class GhostLinear(nn.Module):
    """``model`` (checked by :func:`ghost_linear_reason`) keeping what :meth:`private_grads` needs.

    Parameters
    ----------
    model
        The model; its parameters are trained in place (it is registered as ``_module``).
    params
        The optimizer's parameters (:func:`optimizer_params`), all weights or biases of ``model``'s layers.
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self._module = model
        self.params = list(params)
        order = {id(p): i for i, p in enumerate(self.params)}
        #: per layer: the layer, and the optimizer index of its weight and bias (None: not trained)
        self.plan = [(m, order.get(id(m.weight)), order.get(id(m.bias)) if m.bias is not None else None)
                     if type(m) is nn.Linear else (m, None, None) for m in _layers(model)]
        self.kept: list[tuple[int | None, int | None, torch.Tensor, torch.Tensor]] = []
        #: the flat gradient buffer, in the optimizer's parameter order, and each parameter's view of it (its
        #: ``.grad`` after each step; rewritten whole at every step)
        self.flat = torch.zeros(sum(p.numel() for p in self.params), device=self.params[0].device,
                                dtype=self.params[0].dtype)
        self.views = [v.view(p.shape) for v, p in zip(self.flat.split([p.numel() for p in self.params]),
                                                      self.params)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.is_grad_enabled()
        if keep and self.kept:
            raise ConfigError("client.plugins", "grad_sample_mode 'ghost_linear' clips from one forward and "
                              "backward per step, and a second forward came before the step (a plugin that "
                              "splits the batch, such as microbatch?)", "remove that plugin, or use "
                              "dp_sgd.grad_sample_mode = 'hooks'")
        for m, w, b in self.plan:
            if w is None and b is None:
                x = m(x) if type(m) is not nn.Linear else F.linear(x, m.weight.detach(), _detach(m.bias))
                continue
            if x.dim() != 2:
                raise IncompatibleModelError(f"dp_sgd.grad_sample_mode: 'ghost_linear' needs (batch, features) "
                                             f"inputs to every nn.Linear, one got a {x.dim()}-D input",
                                             "use dp_sgd.grad_sample_mode = 'auto'")
            a = x
            x = F.linear(a, m.weight.detach(), _detach(m.bias))
            if keep:
                if x.requires_grad:
                    x.retain_grad()
                else:
                    x.requires_grad_()
                self.kept.append((w, b, a.detach(), x))
        return x

    @torch.no_grad()
    def private_grads(self, clip: float, std: float, expected_batch_size: int,
                      generator: torch.Generator | None, secure: bool) -> None:
        """Set each parameter's ``.grad`` to Opacus's clipped, noised and scaled gradient of the last backward."""
        kept, self.kept = self.kept, []
        if not kept or any(z.grad is None for *_, z in kept):
            raise ConfigError("client.plugins", "grad_sample_mode 'ghost_linear' found no backward pass since "
                              "the last forward, so there is no per-sample gradient to clip", "let the loop's "
                              "backward run before the step, or use dp_sgd.grad_sample_mode = 'hooks'")
        sq = None  # ||g_i||² = Σ_layers ||δ_i||²·||a_i||² (weight) + ||δ_i||² (bias); fresh tensors, so in place
        for w, b, a, z in kept:
            d2 = torch.linalg.vecdot(z.grad, z.grad)
            a2 = torch.linalg.vecdot(a, a) if w is not None else None
            if sq is None and a2 is None:
                sq = d2
            elif sq is None:
                sq = torch.addcmul(d2, d2, a2) if b is not None else d2.mul_(a2)
            else:
                if b is not None:
                    sq.add_(d2)
                if a2 is not None:
                    sq.addcmul_(d2, a2)
        factor = torch.div(clip, sq.sqrt_().add_(1e-6)).clamp_(max=1.0)  # Opacus: C / (||g_i|| + 1e-6), at most 1
        from opacus.optimizers import optimizer as opacus  # looked up at each step, as DPOptimizer.add_noise does

        # Opacus's own noise function (secure mode included), called as DPOptimizer.add_noise calls it, once
        self.flat.copy_(opacus._generate_noise(std=std, reference=self.flat, generator=generator, secure_mode=secure))
        column = factor.unsqueeze(1)
        for w, b, a, z in kept:
            if w is not None:
                self.views[w].addmm_(z.grad.mul(column).t(), a)
            if b is not None:
                self.views[b].addmv_(z.grad.t(), factor)
        self.flat.div_(expected_batch_size)
        for p, g in zip(self.params, self.views):
            p.grad = g


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
