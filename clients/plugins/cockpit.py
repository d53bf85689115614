"""Cockpit instruments as a probe: how a client's local round ended, measured without changing it.

Reference
---------
Schneider, Dangel, Hennig, "Cockpit: A Practical Debugging Tool for the Training of Deep Neural
Networks", NeurIPS 2021; reference code f-dangel/cockpit, ``cockpit/quantities/``. Spec:
``client-plugins.md`` §B.14.

Once per round (every ``every`` rounds) after the last local step, on the client's fixed probe batch
(:func:`fedsim.clients.diagnostics.probe_indices`, the same examples every round) at the round's final
weights, with the model in eval mode, the plugin writes ``cockpit/<key>`` metrics:

* ``loss`` — mean cross-entropy of the probe batch; ``grad_norm`` — ‖ḡ‖ of its mean gradient;
* ``distance`` — ‖θ − θ_global‖, how far the round moved from the received model;
* ``alpha`` — Cockpit's α of one plain gradient step of the optimizer's current learning rate,
  ``θ → θ − η ḡ``, from a noise-aware quadratic fit (0: lands at the 1-D minimum, 1: at the mirror point);
* ``gsnr`` — mean gradient signal-to-noise ratio over parameters (``MeanGSNR``);
* ``hess_trace`` and ``hess_trace_se`` — Hutchinson's trace of the Hessian (``hutchinson_samples``
  Rademacher vectors) and its standard error;
* ``tic`` — ``TICTrace``: mean squared per-example gradient norm over the (Hutchinson) Hessian trace.

The loss measured is the cross-entropy term only (other plugins' loss terms are not part of it). The
loop restores weights, buffers, gradients and the training RNG after the probe, so training is never
changed; the probe's own randomness comes from ``state.probe_rng``. Every setting is neutral for the
trained weights; the neutral setting is the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.clients import diagnostics as dg
from fedsim.clients.functional import batch_loss_fn, flat, params_of, per_sample_grads
from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin

__all__ = ["Cockpit", "cockpit_metrics"]


def cockpit_metrics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float,
                    generator: torch.Generator, hutchinson_samples: int = 16,
                    global_params: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """The Cockpit quantities of ``model`` on the batch ``(x, y)`` (keys without the ``cockpit/`` prefix).

    Parameters
    ----------
    model : the module, evaluated at its current parameters (not changed)
    x, y : the probe batch
    lr : the step size of the gradient step whose α is measured
    generator : randomness of the Hutchinson vectors
    hutchinson_samples : Rademacher vectors for the Hessian trace (>= 2)
    global_params : the received global parameters; adds ``distance`` when given
    """
    params = {k: v.detach() for k, v in params_of(model).items()}
    mean_loss = batch_loss_fn(model, x, y)
    per_example = per_sample_grads(model, x, y, params=params)
    g = torch.cat([per_example[k].reshape(x.shape[0], -1) for k in params], dim=1)
    mean_grad = g.mean(0)
    trace, trace_se = dg.hutchinson_trace(mean_loss, params, hutchinson_samples, generator)
    step = dg.unflat(-lr * mean_grad, params)
    out = {"loss": float(mean_loss(params)), "grad_norm": float(mean_grad.double().norm()),
           "alpha": dg.step_alpha(dg.individual_losses_fn(model, x, y), params, step),
           "gsnr": dg.gsnr(g), "tic": dg.tic_trace(g, trace), "hess_trace": trace, "hess_trace_se": trace_se}
    if global_params is not None:
        out["distance"] = float((flat(params) - flat({k: global_params[k] for k in params})).double().norm())
    return out


@register_plugin
class Cockpit(ClientPlugin):
    """Cockpit's instruments per client per round (``cockpit/loss``, ``grad_norm``, ``distance``, ``alpha``,
    ``gsnr``, ``tic``, ``hess_trace``, ``hess_trace_se``); probes only, never changes training."""

    name = "cockpit"
    events = frozenset({Event.PROBE})
    needs = frozenset({"global_params"})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["cockpit"]', "client.cockpit.every=5")
    #: a probe cannot change training: the benchmark checks that accuracy is unchanged and measures overhead
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        every: int = 1                 # probe in rounds 1, 1+every, 1+2·every, …
        probe_size: int = 64           # examples in the client's fixed probe batch
        hutchinson_samples: int = 16   # Rademacher vectors for the Hessian trace

        def __post_init__(self) -> None:
            for key, low in (("every", 1), ("probe_size", 2), ("hutchinson_samples", 2)):
                value = getattr(self, key)
                if int(value) != value or value < low:
                    raise ValueError(f"{key} must be an integer >= {low}, got {value}")

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if not dg.is_due(s.every, state.round) or state.x.shape[0] < 2:
            return
        idx = dg.probe_indices(int(state.x.shape[0]), int(s.probe_size), state.seed, state.client_id)
        idx = idx.to(state.x.device)
        state.model.eval()
        lr = float(state.optimizer.param_groups[0]["lr"])
        values = cockpit_metrics(state.model, state.x[idx], state.y[idx], lr, state.probe_rng,
                                 int(s.hutchinson_samples), state.global_params)
        state.metrics.update({f"{self.name}/{k}": v for k, v in values.items()})
