"""TrAct: a gradient step on the first layer's pre-activations, refitted to the weights in closed form.

Reference
---------
Petersen, Borgelt, Ermon, "TrAct: Making First-layer Pre-Activations Trainable", NeurIPS 2024
(arXiv 2410.23970); reference code Felix-Petersen/tract (``TrActLinear`` / ``TrActConv2d``).
Spec: ``client-plugins.md`` §B.9.

For a layer ``Z = A Wᵀ + b`` with inputs ``A`` (``N × n``; for a convolution the unfolded patches, one row
per output position) and ``G = ∂L/∂Z``, plain backprop gives ``∂L/∂W = Gᵀ A``. TrAct instead takes a
step on ``Z`` and solves the ridge problem that maps it back to ``W``, which changes the weight gradient to

    ``Gᵀ A (AᵀA/N + λI)⁻¹``                              (n ≤ N), or, by Woodbury,
    ``(1/λ) Gᵀ (I − (1/λ)(AAᵀ/N)(AAᵀ/(Nλ) + I)⁻¹) A``    (N < n, an N × N solve).

The bias and input gradients are unchanged, and so is the forward pass. As ``λ → ∞``, ``λ·grad′ → grad``;
for whitened inputs (``AᵀA/N = I``) ``grad′ = grad/(1+λ)``.

The plugin swaps the first ``layers`` Linear/Conv2d modules (in module order; the paper: the first layer
only) for TrAct modules at ``ROUND_START`` that reuse the same ``Parameter`` objects (so the optimizer and
the state-dict keys do not change) and puts the originals back at ``ROUND_END``. ``layers = 0`` is the
neutral setting (nothing is swapped: the plain run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.surgery import replace_modules
from fedsim.errors import ConfigError

__all__ = ["TrAct", "TrActConv2d", "TrActLinear", "tract_weight_grad"]


def tract_weight_grad(g: torch.Tensor, a: torch.Tensor, lam: float, woodbury: bool | None = None) -> torch.Tensor:
    """TrAct's weight gradient ``Gᵀ A (AᵀA/N + λI)⁻¹`` (``out × n``) for ``G`` (``N × out``), ``A`` (``N × n``).

    ``woodbury`` picks the branch (``None``: the ``N × N`` Woodbury form when ``N < n``, as the reference does);
    both give the same matrix up to rounding.
    """
    n_rows, n_in = a.shape
    if woodbury is None:
        woodbury = n_rows < n_in
    if woodbury:
        aat = a @ a.T / n_rows
        eye = torch.eye(n_rows, dtype=a.dtype, device=a.device)
        inner = aat @ torch.linalg.solve(aat / lam + eye, eye)
        return g.T @ (eye - inner / lam) @ a / lam
    ata = a.T @ a / n_rows
    eye = torch.eye(n_in, dtype=a.dtype, device=a.device)
    # (GᵀA) M⁻¹ with M symmetric = (M⁻¹ (GᵀA)ᵀ)ᵀ
    return torch.linalg.solve(ata + lam * eye, (g.T @ a).T).T


class _LinearFn(torch.autograd.Function):
    generate_vmap_rule = True  # usable under torch.func transforms (e.g. a probe's per-sample gradients)

    @staticmethod
    def forward(x, weight, bias, lam):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lam = inputs
        ctx.save_for_backward(x, weight)
        ctx.lam, ctx.has_bias = lam, bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        gx = grad_out @ weight if ctx.needs_input_grad[0] else None
        gw = tract_weight_grad(grad_out, x, ctx.lam) if ctx.needs_input_grad[1] else None
        gb = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class _ConvFn(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding, lam):
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, lam = inputs
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.lam, ctx.has_bias = stride, padding, lam, bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, stride=ctx.stride, padding=ctx.padding)
        if ctx.needs_input_grad[1]:
            patches = F.unfold(x, weight.shape[2:], padding=ctx.padding, stride=ctx.stride)  # B, n, L
            a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
            g = grad_out.flatten(2).transpose(1, 2).reshape(-1, grad_out.shape[1])
            gw = tract_weight_grad(g, a, ctx.lam).reshape(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum((0, 2, 3))
        return gx, gw, gb, None, None, None


class TrActLinear(nn.Module):
    """A Linear layer with TrAct's weight gradient; holds the original's ``weight``/``bias`` objects."""

    def __init__(self, linear: nn.Linear, lam: float) -> None:
        super().__init__()
        self.weight, self.bias, self.lam = linear.weight, linear.bias, float(lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = _LinearFn.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.lam)
        return out.reshape(*lead, out.shape[-1])


class TrActConv2d(nn.Module):
    """A Conv2d (``groups = 1``, ``dilation = 1``, zero padding) with TrAct's weight gradient."""

    def __init__(self, conv: nn.Conv2d, lam: float) -> None:
        super().__init__()
        if not supported_conv(conv):
            raise ValueError("TrAct supports Conv2d with groups=1, dilation=1 and zero padding only")
        self.weight, self.bias, self.lam = conv.weight, conv.bias, float(lam)
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ConvFn.apply(x, self.weight, self.bias, self.stride, self.padding, self.lam)


def supported_conv(conv: nn.Conv2d) -> bool:
    return (conv.groups == 1 and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def first_layers(model: nn.Module, count: int) -> list[str]:
    """Names of the first ``count`` Linear/Conv2d modules of ``model``, in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return names[:count]


@register_plugin
class TrAct(ClientPlugin):
    """TrAct's closed-form first-layer update (see the module docstring)."""

    name = "tract"
    events = frozenset({Event.ROUND_START, Event.ROUND_END})
    bench_scenario = "cnn_images"
    bench_overrides = ('client.plugins=["tract"]', "client.tract.lam=0.1")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        #: λ, the ridge regulariser of the refit (the paper's default 0.1); larger = closer to plain SGD/λ
        lam: float = 0.1
        #: how many of the first Linear/Conv2d layers use TrAct (the paper: 1; 0 = neutral, none)
        layers: int = 1

        def __post_init__(self) -> None:
            if not self.lam > 0:
                raise ValueError(f"lam must be > 0, got {self.lam}")
            if self.layers < 0:
                raise ValueError(f"layers must be >= 0, got {self.layers}")

        @classmethod
        def neutral(cls) -> "TrAct.Settings":
            return cls(layers=0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._undo = None

    def preflight(self, scenario) -> None:
        from fedsim.data.federation import federation_of
        from fedsim.models import MODELS

        if not self.settings.layers:
            return
        fed = federation_of(scenario)
        factory = MODELS.get(scenario.model.name, key="model.name")
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = factory(scenario.model, tuple(fed.input_shape), int(fed.num_classes))
        names = first_layers(model, self.settings.layers)
        if len(names) < self.settings.layers:
            raise ConfigError("client.tract.layers", f"model '{scenario.model.name}' has only {len(names)} "
                              f"Linear/Conv2d layers, fewer than {self.settings.layers}",
                              f"set client.tract.layers to at most {len(names)}")
        bad = [n for n in names if isinstance(model.get_submodule(n), nn.Conv2d)
               and not supported_conv(model.get_submodule(n))]
        if bad:
            raise ConfigError("client.tract.layers", f"layers {bad} are grouped or dilated convolutions, "
                              "which TrAct does not support", "use client.tract.layers = 1 or a plain CNN")

    def on(self, event: Event, state: TrainState) -> None:
        lam, count = self.settings.lam, self.settings.layers
        if event is Event.ROUND_START and count:
            targets = set(first_layers(state.model, count))
            self._undo = replace_modules(
                state.model, state.optimizer, lambda name, _: name in targets,
                lambda m: TrActLinear(m, lam) if isinstance(m, nn.Linear) else TrActConv2d(m, lam))
        elif event is Event.ROUND_END and self._undo is not None:
            self._undo()
            self._undo = None
