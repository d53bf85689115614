"""Layer-wise gradient spectra as a probe: nuclear norm and effective rank of every weight matrix's gradient.

Reference
---------
Li et al., "How Instruction and Reasoning Data shape Post-Training: Data Quality through the Lens of
Layer-wise Gradients", 2025. Spec: ``client-plugins.md`` §B.15.

For each weight matrix ``W_l`` (every parameter with two or more dimensions; convolution kernels read
as ``[out, in·kh·kw]``) the gradient ``G_l`` of the mean cross-entropy of the client's fixed probe batch
at the round's final weights has singular values ``σ_i`` (``torch.linalg.svdvals``). The plugin writes
the nuclear norm ``‖G_l‖_* = Σσ_i`` and the effective rank ``exp(−Σ p_i log p_i)``, ``p_i = σ_i/Σσ``:

* ``grad_spectrum/nuclear_mean`` and ``grad_spectrum/erank_mean`` — means over the weight matrices;
* with ``per_layer = true`` also ``grad_spectrum/<parameter>/nuclear`` and ``…/erank`` per matrix
  (``<parameter>`` is the parameter's name without ``.weight``).

The paper reads lower nuclear norms and higher effective ranks as higher-quality data, so per client
they are a data-quality signal. Probes never change training (the loop restores everything); every
setting is neutral for the trained weights, the neutral setting is the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad

from fedsim.clients import diagnostics as dg
from fedsim.clients.functional import batch_loss_fn, params_of
from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin

__all__ = ["GradSpectrum", "layer_spectra"]


def layer_spectra(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[float, float]]:
    """``{parameter name: (nuclear norm, effective rank)}`` of the mean-loss gradient of every weight matrix."""
    params = {k: v.detach() for k, v in params_of(model).items()}
    grads = grad(batch_loss_fn(model, x, y))(params)
    return {k: dg.spectrum_stats(g) for k, g in grads.items() if g.ndim >= 2}


@register_plugin
class GradSpectrum(ClientPlugin):
    """Nuclear norm and effective rank of each weight matrix's gradient on the probe batch (probe only)."""

    name = "grad_spectrum"
    events = frozenset({Event.PROBE})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["grad_spectrum"]', "client.grad_spectrum.every=5")
    #: a probe cannot change training: the benchmark checks that accuracy is unchanged and measures overhead
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        every: int = 1          # probe in rounds 1, 1+every, 1+2·every, …
        probe_size: int = 64    # examples in the client's fixed probe batch
        per_layer: bool = True  # also one nuclear norm / effective rank per weight matrix

        def __post_init__(self) -> None:
            for key, low in (("every", 1), ("probe_size", 1)):
                value = getattr(self, key)
                if int(value) != value or value < low:
                    raise ValueError(f"{key} must be an integer >= {low}, got {value}")

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if not dg.is_due(s.every, state.round) or state.x.shape[0] < 1:
            return
        idx = dg.probe_indices(int(state.x.shape[0]), int(s.probe_size), state.seed, state.client_id)
        idx = idx.to(state.x.device)
        state.model.eval()
        spectra = layer_spectra(state.model, state.x[idx], state.y[idx])
        if not spectra:
            return
        out = state.metrics
        out[f"{self.name}/nuclear_mean"] = sum(n for n, _ in spectra.values()) / len(spectra)
        out[f"{self.name}/erank_mean"] = sum(e for _, e in spectra.values()) / len(spectra)
        if s.per_layer:
            for param, (nuclear, erank) in spectra.items():
                layer = param.removesuffix(".weight")
                out[f"{self.name}/{layer}/nuclear"] = nuclear
                out[f"{self.name}/{layer}/erank"] = erank
