"""Ghost batch norm with √-LR scaling and regime adaptation ("Train longer, generalize better").

Reference
---------
Hoffer, Hubara, Soudry, "Train longer, generalize better: closing the generalization gap in large batch
training of neural networks", NeurIPS 2017 (arXiv 1705.08741); code eladhoffer/bigBatch. Module surgery
after Composer's ghost batch norm. Spec: ``client-plugins.md`` §B.2.

* **Ghost BN.** In training, a batch of ``B`` is cut into ``K = ⌈B/B_g⌉`` near-equal chunks
  (``torch.tensor_split``) and each is normalised with its own mean and variance. The running statistics
  see ``K`` updates per step, each with momentum ``m/K`` (a cumulative average, ``momentum=None``, counts
  every chunk). Evaluation uses the running statistics, as BatchNorm does. ``B ≤ B_g`` is one ghost batch:
  exactly BatchNorm.
* **√-LR scaling** (``lr_scaling``): the learning rate of every parameter group is ``η₀·√(B/B₀)``.
* **Regime adaptation** (``regime``): ``e = e₀·B/B₀`` local epochs (rounded, at least one), the same number
  of updates as with batch ``B₀``. It cannot coexist with ``client.max_steps``, which fixes the number of
  updates (refused before the run). The reference also scales its LR-drop epochs; fedsim's clients have no
  local LR schedule.

The BatchNorm modules are swapped at ``ROUND_START`` for ghost modules sharing their parameters and
buffers (the optimizer keeps its references) and put back at ``ROUND_END``, so the state-dict keys the
server sees never change. A model without BatchNorm is refused before the run (``model.norm``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.surgery import replace_modules
from fedsim.errors import ConfigError

__all__ = ["GhostBatchNorm", "GhostBN", "regime_epochs", "sqrt_lr"]


class GhostBatchNorm(nn.Module):
    """A BatchNorm that normalises each of ``⌈B/B_g⌉`` chunks of a training batch separately.

    It holds the original module's parameters and buffers (the same tensor objects, the same names),
    so updating one updates the other.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, ghost_batch_size: int) -> None:
        super().__init__()
        self.ghost_batch_size = int(ghost_batch_size)
        self.eps, self.momentum = bn.eps, bn.momentum
        self.track_running_stats = bn.track_running_stats
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))

    def chunks(self, batch: int) -> int:
        """How many ghost batches a training batch of ``batch`` examples is cut into."""
        return max(1, math.ceil(batch / self.ghost_batch_size)) if self.ghost_batch_size > 0 else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        k = self.chunks(int(x.shape[0])) if self.training else 1
        outs = []
        for part in x.tensor_split(k):
            factor = 0.0
            if self.training and self.track_running_stats and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum / k
            track = self.training and self.track_running_stats
            outs.append(nn.functional.batch_norm(part, self.running_mean if track else None,
                                                 self.running_var if track else None, self.weight, self.bias,
                                                 True, factor, self.eps))
        return outs[0] if k == 1 else torch.cat(outs)


def sqrt_lr(lr: float, batch_size: int, base_batch_size: int) -> float:
    """``η₀·√(B/B₀)``: Hoffer et al.'s learning rate for batch ``B`` given ``η₀`` tuned at ``B₀``."""
    return lr * math.sqrt(batch_size / base_batch_size)


def regime_epochs(epochs: int, batch_size: int, base_batch_size: int) -> int:
    """``e₀·B/B₀`` rounded to the nearest integer, at least 1 (the same number of updates as at ``B₀``)."""
    return max(1, round(epochs * batch_size / base_batch_size))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@register_plugin
class GhostBN(ClientPlugin):
    """BatchNorm → ghost BatchNorm for the round, with optional √-LR scaling and regime adaptation."""

    name = "ghost_bn"
    events = frozenset({Event.ROUND_START, Event.ROUND_END})
    tiny_overrides = ('model.name="cnn"', 'model.norm="batch"', "model.channels=[4]")
    bench_scenario = "cnn_images"
    bench_overrides = ('client.plugins=["ghost_bn"]', 'model.norm="batch"', "client.batch_size=128",
                       "client.ghost_bn.ghost_batch_size=32")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        #: examples per ghost batch B_g (0 = the whole batch: plain BatchNorm); the reference's default 128
        ghost_batch_size: int = 128
        #: scale the learning rate by √(B/B₀)
        lr_scaling: bool = False
        #: scale the local epochs by B/B₀ (refused with client.max_steps)
        regime: bool = False
        #: the batch size B₀ the learning rate and epochs were tuned for
        base_batch_size: int = 128

        def __post_init__(self) -> None:
            if self.ghost_batch_size < 0:
                raise ValueError(f"ghost_batch_size must be >= 0 (0 = whole batch), got {self.ghost_batch_size}")
            if self.base_batch_size < 1:
                raise ValueError(f"base_batch_size must be >= 1, got {self.base_batch_size}")

        @classmethod
        def neutral(cls) -> "GhostBN.Settings":
            return cls(ghost_batch_size=0, lr_scaling=False, regime=False)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._undo = None

    def preflight(self, scenario) -> None:
        from fedsim.data.federation import federation_of
        from fedsim.models import MODELS

        fed = federation_of(scenario)
        factory = MODELS.get(scenario.model.name, key="model.name")
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = factory(scenario.model, tuple(fed.input_shape), int(fed.num_classes))
        if not has_batchnorm(model):
            fix = ('set model.norm = "batch" (with model.name = "cnn")' if scenario.model.name == "cnn"
                   else 'use a model with BatchNorm, e.g. model.name = "cnn" with model.norm = "batch"')
            raise ConfigError("model.norm", f"ghost_bn replaces BatchNorm layers, but model '{scenario.model.name}' "
                              f"(norm '{getattr(scenario.model, 'norm', 'none')}') has none, so it would do nothing",
                              fix)
        if self.settings.regime and scenario.client.max_steps:
            raise ConfigError("client.ghost_bn.regime", "regime adaptation sets the number of local updates "
                              f"(epochs × B/B₀), but client.max_steps = {scenario.client.max_steps} fixes it",
                              "set client.max_steps = 0, or client.ghost_bn.regime = false")

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if event is Event.ROUND_START:
            if not has_batchnorm(state.model):
                raise ConfigError("model.norm", "ghost_bn found no BatchNorm layer in the model",
                                  'use model.name = "cnn" with model.norm = "batch"')
            if s.ghost_batch_size:
                self._undo = replace_modules(
                    state.model, state.optimizer,
                    lambda _, m: isinstance(m, nn.modules.batchnorm._BatchNorm),
                    lambda m: GhostBatchNorm(m, s.ghost_batch_size))
            if s.lr_scaling:
                for group in state.optimizer.param_groups:
                    group["lr"] = sqrt_lr(group["lr"], state.batch_size, s.base_batch_size)
            if s.regime:
                state.epochs = regime_epochs(state.epochs, state.batch_size, s.base_batch_size)
                per_epoch = -(-int(state.x.shape[0]) // state.batch_size)
                state.planned_steps = per_epoch * state.epochs
        elif event is Event.ROUND_END:
            if self._undo is not None:
                self._undo()
                self._undo = None
            if s.ghost_batch_size:
                state.metrics["ghost_bn/ghosts_per_batch"] = float(max(1, math.ceil(state.batch_size
                                                                                    / s.ghost_batch_size)))
