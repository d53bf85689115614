"""ReSTE: a binarised client model trained with the rectified straight-through estimator.

Reference
---------
Wu, Zheng, Liu, Zheng, "Estimator Meets Equilibrium Perspective: A Rectified Straight Through Estimator
for Binary Neural Networks Training", ICCV 2023 (arXiv 2308.06689); reference code DravenALG/ReSTE.
Spec: ``client-plugins.md`` §B.10.

* **Forward.** A binarised layer computes with ``sign(W)·mean|W|`` (one scale per layer, as the reference's
  ``BinarizeConv2d``; the scale is differentiable) and, with ``activations = true``, with ``sign(a)`` of its
  input (1W/1A; the first layer of the network never binarises its raw input).
* **Backward.** ``sign`` is differentiated as the power function ``g_o(x) = sign(x)|x|^{1/o}``:
  ``(1/o)|x|^{1/o−1}`` for ``0.1 < |x| ≤ t``, the secant slope ``0.1^{1/o}/0.1`` for ``|x| ≤ 0.1`` (no
  singularity at 0) and ``0`` for ``|x| > t``. At ``o = 1`` it is the clipped STE ``1{|x| ≤ t}``.
* **Schedule.** ``o(p) = 1 + (o_end − 1)(1 − cos(πp/2))`` with ``p = state.progress``, the progress of the
  whole federated run (set before every step, so it rises monotonically and never restarts in a round).

Which layers: ``layers = "hidden"`` (the paper: every Linear/Conv2d but the first and the last),
``"all_but_last"``, or ``"none"`` (the neutral setting: the plain run). The modules are swapped at
``ROUND_START`` for binarised ones holding the same ``Parameter`` objects and put back at ``ROUND_END``.

Uplink (``uplink = "binary"``, the default): at ``ROUND_END`` each binarised layer's latent weights are
replaced by the weights it computes with, ``mean|W|·sgn(W)``, and the reply carries exactly one sign bit per
weight plus one float32 scale per layer on the wire (``reste/uplink_bits`` reports that count: ``numel + 32``
per layer). The plugin marks those weights (a ``codec.sign1:<key>`` metric); the client's reply packs them
with :mod:`fedsim.sign_codec` and the server decodes them back to dense float32 before any strategy reads
the reply, so every strategy aggregates them (the server averages the clients' binary weights). The uplink's
``sgn`` maps an exact zero latent weight to ``+1`` (1 bit has no third value; the forward's ``sign(0) = 0``
differs only on exact zeros), so the codec is exact for what is sent. ``uplink = "latent"`` sends the
real-valued latent weights, dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.surgery import replace_modules
from fedsim.errors import ConfigError
from fedsim.sign_codec import MARKER_PREFIX

__all__ = ["BinaryConv2d", "BinaryLinear", "ReSTE", "binarize", "o_schedule", "reste_slope"]

INTERVAL = 0.1  # below this |x| the estimator uses its secant slope
LAYER_CHOICES = ("hidden", "all_but_last", "none")
UPLINK_CHOICES = ("binary", "latent")


def o_schedule(progress: float, o_end: float) -> float:
    """``o(p) = 1 + (o_end − 1)(1 − cos(πp/2))``: 1 at ``p = 0``, ``o_end`` at ``p = 1``, monotone between."""
    p = min(max(float(progress), 0.0), 1.0)
    return 1.0 + (o_end - 1.0) * (1.0 - math.cos(math.pi * p / 2.0))


def reste_slope(x: torch.Tensor, t: float, o: float) -> torch.Tensor:
    """ReSTE's derivative of ``sign`` at ``x``: ``(1/o)|x|^{1/o−1}`` on ``0.1 < |x| ≤ t``, the secant slope
    ``0.1^{1/o}/0.1`` on ``|x| ≤ 0.1``, 0 beyond ``t``."""
    ax = x.abs()
    power = (1.0 / o) * ax.clamp_min(INTERVAL).pow(1.0 / o - 1.0)
    secant = INTERVAL ** (1.0 / o) / INTERVAL
    slope = torch.where(ax <= INTERVAL, torch.full_like(x, secant), power)
    return torch.where(ax <= t, slope, torch.zeros_like(x))


class _SignReSTE(torch.autograd.Function):
    generate_vmap_rule = True  # usable under torch.func transforms (e.g. a probe's per-sample gradients)

    @staticmethod
    def forward(x, t, o):
        return torch.sign(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, o = inputs
        ctx.save_for_backward(x)
        ctx.t, ctx.o = t, o

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * reste_slope(x, ctx.t, ctx.o), None, None


def binarize(x: torch.Tensor, t: float, o: float) -> torch.Tensor:
    """``sign(x)`` forward, ReSTE backward."""
    return _SignReSTE.apply(x, t, o)


def binary_weight(w: torch.Tensor, t: float, o: float) -> torch.Tensor:
    """``mean|W|·sign(W)`` with the ReSTE estimator for ``sign`` (the scale is differentiable)."""
    return binarize(w, t, o) * w.abs().mean()


class _Binary(nn.Module):
    """Shared part of the binarised layers: the original's parameters, ``t``, the current ``o``."""

    def __init__(self, layer: nn.Module, t: float, activations: bool) -> None:
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.t, self.o, self.activations = float(t), 1.0, bool(activations)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return binarize(x, self.t, self.o) if self.activations else x


class BinaryLinear(_Binary):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.inputs(x), binary_weight(self.weight, self.t, self.o), self.bias)


class BinaryConv2d(_Binary):
    def __init__(self, conv: nn.Conv2d, t: float, activations: bool) -> None:
        super().__init__(conv, t, activations)
        self.conv = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        if conv.padding_mode != "zeros":
            raise ValueError("ReSTE binarises Conv2d with zero padding only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.inputs(x), binary_weight(self.weight, self.t, self.o), self.bias, **self.conv)


def select_layers(model: nn.Module, which: str) -> list[str]:
    """Names of the Linear/Conv2d layers ``which`` selects (module order)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if which == "none":
        return []
    return names[1:-1] if which == "hidden" else names[:-1]


@register_plugin
class ReSTE(ClientPlugin):
    """Binarised local training with the rectified straight-through estimator (module docstring)."""

    name = "reste"
    events = frozenset({Event.ROUND_START, Event.BATCH, Event.ROUND_END})
    tiny_overrides = ("model.hidden=[16, 16]",)
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["reste"]', "model.hidden=[128, 128]", "client.reste.o_end=3.0")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        #: which Linear/Conv2d layers are binarised: "hidden" (all but first and last), "all_but_last", "none"
        layers: str = "hidden"
        #: also binarise the inputs of the binarised layers (1W/1A); false = 1W/32A
        activations: bool = True
        #: the estimator's clipping threshold t (the paper's 1.5)
        t: float = 1.5
        #: o at the end of the run (the paper's 3); o rises from 1 with global progress
        o_end: float = 3.0
        #: "binary": send mean|W|·sign(W) of binarised layers (1 bit per weight + a scale); "latent": latent weights
        uplink: str = "binary"

        def __post_init__(self) -> None:
            if self.layers not in LAYER_CHOICES:
                raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {self.layers!r}")
            if self.uplink not in UPLINK_CHOICES:
                raise ValueError(f"uplink must be one of {UPLINK_CHOICES}, got {self.uplink!r}")
            if not self.t > INTERVAL:
                raise ValueError(f"t must be > {INTERVAL} (the secant interval), got {self.t}")
            if not self.o_end >= 1.0:
                raise ValueError(f"o_end must be >= 1 (o = 1 is the clipped STE), got {self.o_end}")

        @classmethod
        def neutral(cls) -> "ReSTE.Settings":
            return cls(layers="none")

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._undo = None
        self._layers: list[_Binary] = []

    def preflight(self, scenario) -> None:
        from fedsim.data.federation import federation_of
        from fedsim.models import MODELS

        if self.settings.layers == "none":
            return
        fed = federation_of(scenario)
        factory = MODELS.get(scenario.model.name, key="model.name")
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = factory(scenario.model, tuple(fed.input_shape), int(fed.num_classes))
        if not select_layers(model, self.settings.layers):
            raise ConfigError("client.reste.layers", f"'{self.settings.layers}' selects no layer of model "
                              f"'{scenario.model.name}' (the first and last layers stay full precision)",
                              "add a hidden layer (e.g. model.hidden = [64, 64]) or use layers = \"all_but_last\"")

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if event is Event.ROUND_START:
            names = select_layers(state.model, s.layers)
            first = next((m for m in state.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)

            def make(m: nn.Module) -> nn.Module:
                acts = s.activations and m is not first  # never binarise the raw input
                return BinaryLinear(m, s.t, acts) if isinstance(m, nn.Linear) else BinaryConv2d(m, s.t, acts)
            if names:
                self._undo = replace_modules(state.model, state.optimizer, lambda n, _: n in names, make)
                self._layers = [new for _, _, new in self._undo.swapped]
        elif event is Event.BATCH:
            o = o_schedule(state.progress, s.o_end)
            for layer in self._layers:
                layer.o = o
        elif event is Event.ROUND_END and self._undo is not None:
            bits = 0
            if s.uplink == "binary":
                with torch.no_grad():
                    for name, _, layer in self._undo.swapped:
                        w = layer.weight
                        w.copy_(torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * w.abs().mean())  # sgn(0) = +1
                        bits += w.numel() + 32
                        state.metrics[f"{MARKER_PREFIX}{name}.weight"] = 1.0  # fit_reply packs it to 1 bit
            state.metrics["reste/o"] = o_schedule(state.progress, s.o_end)
            state.metrics["reste/uplink_bits"] = float(bits)
            self._undo()
            self._undo, self._layers = None, []
