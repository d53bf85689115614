"""GB-NN: the final hidden layer trained block by block as gradient-boosted stages.

Reference
---------
Emami, Martínez-Muñoz, "Sequential Training of Neural Networks with Gradient Boosting", IEEE Access 11
(2023), arXiv 2109.12536. Spec: ``client-plugins.md`` §B.20 (head-only form, on frozen features).

The head is the model's last two Linear layers: ``F(x) = b + V φ(W z + c)`` with ``z`` the features of the
layers before them (the raw input for a one-hidden-layer MLP; frozen). Its ``H`` hidden units are cut into
``T = stages`` blocks of ``J = H/T`` units. Gradient boosting with cross-entropy:

* ``F₀ = b₀``: the log class priors of the client's data (Laplace-smoothed; the server averages them);
* stage ``t``: pseudo-residuals ``r = −∂ℓ/∂F|_{F_{t−1}} = onehot(y) − softmax(F_{t−1}(x))``; block ``t``
  (``W_t, c_t`` and its output columns ``V_t``) is fitted to ``r`` by least squares,
  ``mean_i ½‖V_t h_t(x_i) − r_i‖²``, while every other
  parameter stays frozen; ``F_t = F_{t−1} + ν V_t φ(W_t z + c_t)``.

The output columns store ``ν V_t``, so the model *is* the merged network ``F_t`` (the sum of the stage
outputs), and zeroing the output columns of the last blocks gives ``F_{t′}`` (anytime inference,
:func:`truncate`). Blocks not trained yet have zero output columns. In federated training the stage is
chosen by the run's progress, ``t = ⌊T·progress⌋``, so every client fits the same block in a round and
FedAvg averages fits of the same residual problem. The plugin replaces the cross-entropy term of the loop
by the stage's MSE (``train_loss`` reports it); ``gb_nn/stage`` and ``gb_nn/prior_ce`` (the cross-entropy
of ``F_{t−1}`` on the batches seen) are reported. ``stages = 0`` is neutral (the plain run).
The defaults (``T = 4``, ``ν = 0.5``) are ours: the paper tunes T, J and ν per dataset, and its grids were
not checked against a stored source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.errors import ConfigError

__all__ = ["GBNN", "head_layers", "log_priors", "pseudo_residuals", "squared_error", "stage_outputs", "truncate"]


def pseudo_residuals(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``−∂CE/∂F = onehot(y) − softmax(F)`` per sample (the negative gradient of the summed loss)."""
    return F.one_hot(y, logits.shape[1]).to(logits.dtype) - logits.softmax(1)


def squared_error(fit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The stage loss ``mean_i ½‖fit_i − r_i‖²`` (its gradient in the logits has cross-entropy's scale)."""
    return 0.5 * (fit - target).square().sum(1).mean()


def log_priors(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``F₀``: Laplace-smoothed log class frequencies, the constant minimising cross-entropy (up to smoothing)."""
    counts = torch.bincount(y, minlength=num_classes).to(torch.float32)
    return torch.log((counts + 1.0) / (counts.sum() + num_classes))


def head_layers(model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The last two Linear layers of ``model``: the hidden layer ``(W, c)`` and the output ``(V, b)``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise ValueError("gb_nn needs a model whose last two layers are Linear (a hidden layer and the output)")
    return linears[-2], linears[-1]


def stage_outputs(hidden: torch.Tensor, out: nn.Linear, stages: int) -> list[torch.Tensor]:
    """Each block's contribution ``ν V_t h_t`` to the logits, for hidden activations ``hidden`` (``N × H``)."""
    width = hidden.shape[1] // stages
    return [hidden[:, t * width:(t + 1) * width] @ out.weight[:, t * width:(t + 1) * width].T for t in range(stages)]


@torch.no_grad()
def truncate(model: nn.Module, stages: int, keep: int) -> None:
    """Anytime inference: switch off every block after the first ``keep`` (zero their output columns)."""
    _, out = head_layers(model)
    width = out.weight.shape[1] // stages
    out.weight[:, keep * width:].zero_()


@register_plugin
class GBNN(ClientPlugin):
    """Gradient-boosted, block-by-block training of the final hidden layer (see the module docstring)."""

    name = "gb_nn"
    events = frozenset({Event.ROUND_START, Event.BATCH, Event.BEFORE_STEP, Event.AFTER_STEP, Event.ROUND_END})
    tiny_overrides = ("model.hidden=[16]",)
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["gb_nn"]', "model.hidden=[64]", "client.gb_nn.stages=4",
                       "client.gb_nn.nu=1.0", "client.momentum=0.0", "client.lr=0.3", "client.epochs=5")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        #: T, the number of boosting stages (blocks of the last hidden layer); 0 = neutral (plain training)
        stages: int = 4
        #: ν, the shrinkage applied to each stage's fit
        nu: float = 0.5

        def __post_init__(self) -> None:
            if self.stages < 0:
                raise ValueError(f"stages must be >= 0 (0 = plain training), got {self.stages}")
            if not 0.0 < self.nu <= 1.0:
                raise ValueError(f"nu must lie in (0, 1], got {self.nu}")

        @classmethod
        def neutral(cls) -> "GBNN.Settings":
            return cls(stages=0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._hook = None
        self._hidden: torch.Tensor | None = None
        self._saved: list[torch.Tensor] = []
        self._loss_fn = None
        self.stage = 0
        self._prior_ce = [0.0, 0]

    def preflight(self, scenario) -> None:
        from fedsim.data.federation import federation_of
        from fedsim.models import MODELS

        if not self.settings.stages:
            return
        fed = federation_of(scenario)
        factory = MODELS.get(scenario.model.name, key="model.name")
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = factory(scenario.model, tuple(fed.input_shape), int(fed.num_classes))
        try:
            hidden, _ = head_layers(model)
        except ValueError as err:
            raise ConfigError("model.name", f"{err}; model '{scenario.model.name}' has no such head",
                              'use model.name = "mlp" with at least one hidden layer') from err
        if hidden.out_features % self.settings.stages:
            raise ConfigError("client.gb_nn.stages", f"the last hidden layer's {hidden.out_features} units do not "
                              f"split into {self.settings.stages} equal blocks",
                              "choose stages dividing the last entry of model.hidden")

    def _stage(self, progress: float) -> int:
        return min(int(math.floor(progress * self.settings.stages)), self.settings.stages - 1)

    def on(self, event: Event, state: TrainState) -> None:
        if not self.settings.stages:
            return
        if event is Event.ROUND_START:
            self._start(state)
        elif event is Event.BATCH:
            self.stage = self._stage(state.progress)
        elif event is Event.BEFORE_STEP:
            self._saved = [p.detach().clone() for p in state.model.parameters()]
        elif event is Event.AFTER_STEP:
            self._freeze_all_but_block(state.model)
        elif event is Event.ROUND_END:
            self._hook.remove()
            state.loss_fn, self._hook, self._hidden = self._loss_fn, None, None
            state.metrics["gb_nn/stage"] = float(self.stage)
            state.metrics["gb_nn/prior_ce"] = self._prior_ce[0] / max(self._prior_ce[1], 1)

    def _start(self, state: TrainState) -> None:
        hidden, out = head_layers(state.model)
        stages, nu = self.settings.stages, self.settings.nu
        self.stage = self._stage(state.progress)
        width = out.weight.shape[1] // stages
        with torch.no_grad():
            out.bias.copy_(log_priors(state.y, out.out_features).to(out.bias))
            out.weight[:, (self.stage + 1) * width:].zero_()  # blocks not trained yet contribute nothing
        self._prior_ce = [0.0, 0]

        def capture(_module, args):
            self._hidden = args[0]
        self._hook = out.register_forward_pre_hook(capture)
        self._loss_fn = state.loss_fn

        def stage_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            t, h = self.stage, self._hidden
            block = slice(t * width, (t + 1) * width)
            with torch.no_grad():
                prev = out.bias + h[:, :t * width] @ out.weight[:, :t * width].T
                self._prior_ce[0] += float(F.cross_entropy(prev, y, reduction="sum"))
                self._prior_ce[1] += int(y.shape[0])
                target = pseudo_residuals(prev, y)
            fit = h[:, block] @ out.weight[:, block].T / nu
            return squared_error(fit, target)
        state.loss_fn = stage_loss

    @torch.no_grad()
    def _freeze_all_but_block(self, model: nn.Module) -> None:
        """Put back every parameter the stage does not own (whatever the optimizer did to it)."""
        hidden, out = head_layers(model)
        width = out.weight.shape[1] // self.settings.stages
        block = slice(self.stage * width, (self.stage + 1) * width)
        for p, saved in zip(model.parameters(), self._saved):
            if p is hidden.weight or p is hidden.bias:
                kept = p[block].clone()
                p.copy_(saved)
                p[block] = kept
            elif p is out.weight:
                kept = p[:, block].clone()
                p.copy_(saved)
                p[:, block] = kept
            else:
                p.copy_(saved)
        self._saved = []
