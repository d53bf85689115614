"""Top Hessian eigenvalues as a probe: the outliers of the loss curvature at the end of a local round.

Reference
---------
Sagun, Evci, Güney, Dauphin, Bottou, "Empirical Analysis of the Hessian of Over-Parametrized Neural
Networks", ICLR 2018 workshop (arXiv 1706.04454). Spec: ``client-plugins.md`` §B.16; Cockpit's
``HessMaxEV`` (power iteration on Hessian-vector products) is the ``method = "power"`` variant.

On the client's fixed probe batch at the round's final weights (model in eval mode), the ``k``
eigenvalues of largest magnitude of the Hessian of the mean cross-entropy, from Hessian-vector
products only (:func:`fedsim.clients.functional.hvp`):

* ``method = "lanczos"`` — scipy's implicitly restarted Lanczos (``eigsh``) on a ``LinearOperator``;
* ``method = "power"`` — power iteration with deflation.

Metrics: ``hessian_top/eig1`` … ``eigk`` (largest magnitude first, signed) and ``hessian_top/converged``
(how many converged within ``max_iter``; only those are reported). Sagun et al. find a bulk near zero
plus about one outlier per class, so ``k`` of the number of classes or a few more shows the outliers.
Probes never change training; every setting is neutral for the trained weights (the default is the
neutral setting). Randomness (start vectors) comes from ``state.probe_rng``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.clients import diagnostics as dg
from fedsim.clients.functional import batch_loss_fn, params_of
from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.errors import ConfigError

__all__ = ["HessianTop"]

METHODS = ("lanczos", "power")


@register_plugin
class HessianTop(ClientPlugin):
    """``k`` largest-magnitude Hessian eigenvalues by Lanczos or power iteration (probe only)."""

    name = "hessian_top"
    events = frozenset({Event.PROBE})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["hessian_top"]', "client.hessian_top.every=5")
    #: a probe cannot change training: the benchmark checks that accuracy is unchanged and measures overhead
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        every: int = 1            # probe in rounds 1, 1+every, 1+2·every, …
        probe_size: int = 64      # examples in the client's fixed probe batch
        k: int = 3                # eigenvalues of largest magnitude
        method: str = "lanczos"   # lanczos | power
        max_iter: int = 100       # Lanczos restarts, or power iterations per eigenvalue
        tol: float = 1e-5         # relative tolerance of the eigenvalues

        def __post_init__(self) -> None:
            for key, low in (("every", 1), ("probe_size", 1), ("k", 1), ("max_iter", 1)):
                value = getattr(self, key)
                if int(value) != value or value < low:
                    raise ValueError(f"{key} must be an integer >= {low}, got {value}")
            if self.method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
            if not 0 < self.tol < 1:
                raise ValueError(f"tol must be in (0, 1), got {self.tol}")

    def preflight(self, scenario) -> None:
        """Refuse a ``k`` the model cannot have: at most (parameters − 1) eigenvalues are found."""
        from fedsim.data.federation import federation_of
        from fedsim.models import count_parameters

        fed = federation_of(scenario)
        count = count_parameters(scenario.model, tuple(fed.input_shape), int(fed.num_classes))
        if self.settings.k >= count:
            raise ConfigError(f"client.{self.name}.k", f"k = {self.settings.k} eigenvalues asked of a model with "
                              f"{count} parameters (Lanczos finds at most {count - 1})",
                              f"set client.{self.name}.k below {count}")

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if not dg.is_due(s.every, state.round) or state.x.shape[0] < 1:
            return
        idx = dg.probe_indices(int(state.x.shape[0]), int(s.probe_size), state.seed, state.client_id)
        idx = idx.to(state.x.device)
        state.model.eval()
        params = {k: v.detach() for k, v in params_of(state.model).items()}
        f = batch_loss_fn(state.model, state.x[idx], state.y[idx])
        eigs = dg.hessian_top_eigenvalues(f, params, int(s.k), state.probe_rng, s.method, int(s.max_iter), s.tol)
        state.metrics[f"{self.name}/converged"] = float(len(eigs))
        for i, lam in enumerate(eigs, start=1):
            state.metrics[f"{self.name}/eig{i}"] = lam
