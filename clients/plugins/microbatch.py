"""GPipe's memory half on one client: micro-batches with gradient accumulation and activation checkpointing.

Reference
---------
Huang et al., "GPipe: Efficient Training of Giant Neural Networks using Pipeline Parallelism", NeurIPS 2019
(arXiv 1811.06965). Spec: ``client-plugins.md`` §B.22.

GPipe splits a batch into ``M`` micro-batches and the model into ``K`` stages, keeps only each stage's
input during the forward pass and recomputes the inside in the backward pass; one synchronous update
follows. On one client without a pipeline this is:

* **micro-batching** (``micro_batches = M``): the batch is cut into ``M`` near-equal parts; each part's
  loss, weighted by its share of the batch (``n_m/B``), is back-propagated in turn, so the accumulated
  gradient is the full batch's mean gradient while only one part's activations are alive at a time;
* **activation checkpointing** (``segments = K``): the layers of the (``nn.Sequential``) model are cut into
  ``K`` contiguous segments and each runs under ``torch.utils.checkpoint`` (non-reentrant; the RNG state is
  replayed, so dropout draws the same masks in the recomputation). BatchNorm running statistics are
  updated once per forward, never again by the recomputation.

The plugin owns ``"forward"``: the loop calls :meth:`MicroBatch.forward_backward` instead of its forward,
loss and backward, and the ``BEFORE_FORWARD`` .. ``LOSS`` events fire once per micro-batch (with
``state.batch`` / ``state.batch_indices`` set to that part). Loss terms that are means over examples
(cross-entropy, per-example penalties) give exactly the full batch's gradient; a term computed over the
whole batch at once (a batch-level statistic, BatchNorm's batch statistics) is computed per micro-batch,
as in GPipe. ``micro_batches = 1, segments = 0`` is neutral: the plain forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.errors import ConfigError

__all__ = ["MicroBatch", "accumulated_backward", "checkpointed_forward", "peak_rss_increase", "segments_of"]


def segments_of(model: nn.Sequential, k: int) -> list[list[nn.Module]]:
    """The model's layers in ``min(k, len(model))`` contiguous groups of near-equal length."""
    layers = list(model)
    k = max(1, min(k, len(layers)))
    return [layers[i * len(layers) // k:(i + 1) * len(layers) // k] for i in range(k)]


def _run_segment(layers: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    calls = [0]
    tracked = [m for layer in layers for m in layer.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]

    def run(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                 for m in tracked] if calls[0] > 1 else []
        try:
            for layer in layers:
                x = layer(x)
            return x
        finally:  # a recomputation (which torch may stop early): keep the running statistics of the first forward
            with torch.no_grad():
                for m, (mean, var, count) in zip(tracked, saved):
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)
    return run


def checkpointed_forward(model: nn.Sequential, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model``'s forward with each of ``k`` segments under activation checkpointing (plain when
    gradients are off)."""
    segs = segments_of(model, k)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            for layer in model:
                x = layer(x)
            return x
        for seg in segs:
            x = checkpoint(_run_segment(seg), x, use_reentrant=False, preserve_rng_state=True)
        return x
    return forward


def accumulated_backward(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                         y: torch.Tensor, m: int, create_graph: bool = False) -> list[tuple[int, torch.Tensor]]:
    """Back-propagate ``Σ_m (n_m/B)·loss_of(x_m, y_m)`` one micro-batch at a time (gradients accumulate
    in ``.grad``); returns ``(n_m, loss_m)`` per non-empty micro-batch."""
    total = int(x.shape[0])
    out = []
    for part in torch.arange(total, device=x.device).tensor_split(max(1, min(m, total))):
        if part.numel() == 0:
            continue
        loss = loss_of(x[part], y[part])
        (loss * (part.numel() / total)).backward(create_graph=create_graph)
        out.append((int(part.numel()), loss))
    return out


def peak_rss_increase(fn: Callable[[], object]) -> int:
    """Bytes by which the process's peak resident memory rises above its current size while ``fn()`` runs.

    Linux only (``/proc/self/clear_refs`` resets the peak, ``VmHWM``). Call ``fn`` once before measuring
    so that one-off allocations are not counted; large allocations must go straight to the OS
    (``mallopt(M_MMAP_THRESHOLD, ...)``, see the tests) for the figure to follow tensor lifetimes.
    """
    def kib(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = kib("VmRSS")
    fn()
    return (kib("VmHWM") - base) * 1024


@register_plugin
class MicroBatch(ClientPlugin):
    """Micro-batched gradient accumulation with activation checkpointing (GPipe, NeurIPS 2019)."""

    name = "microbatch"
    events = frozenset({Event.ROUND_START, Event.ROUND_END})
    owns = frozenset({"forward"})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["microbatch"]', "client.microbatch.micro_batches=4",
                       "client.microbatch.segments=2")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        #: M: parts each batch is cut into (1 = the whole batch at once)
        micro_batches: int = 4
        #: K: checkpointed segments of the Sequential model (0 = no checkpointing)
        segments: int = 0

        def __post_init__(self) -> None:
            if self.micro_batches < 1:
                raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
            if self.segments < 0:
                raise ValueError(f"segments must be >= 0 (0 = no checkpointing), got {self.segments}")

        @classmethod
        def neutral(cls) -> "MicroBatch.Settings":
            return cls(micro_batches=1, segments=0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._patched: nn.Module | None = None

    def preflight(self, scenario) -> None:
        if self.settings.segments:
            from fedsim.data.federation import federation_of
            from fedsim.models import MODELS

            fed = federation_of(scenario)
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                model = MODELS.get(scenario.model.name, key="model.name")(
                    scenario.model, tuple(fed.input_shape), int(fed.num_classes))
            _check_sequential(model)

    def on(self, event: Event, state: TrainState) -> None:
        if event is Event.ROUND_START and self.settings.segments:
            _check_sequential(state.model)
            state.model.forward = checkpointed_forward(state.model, self.settings.segments)
            self._patched = state.model
        elif event is Event.ROUND_END and self._patched is not None:
            del self._patched.forward  # back to the class's forward
            self._patched = None

    def forward_backward(self, state: TrainState,
                         forward_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        bx, by = state.batch
        if self.settings.micro_batches == 1:  # exactly the loop's own order of calls
            loss = forward_loss(bx, by)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward(create_graph=state.create_graph)
            return
        full_batch, full_idx = state.batch, state.batch_indices
        state.optimizer.zero_grad(set_to_none=True)
        outputs, terms, total, offset = [], {}, int(by.shape[0]), [0]

        def part_loss(xm: torch.Tensor, ym: torch.Tensor) -> torch.Tensor:
            n = int(ym.shape[0])
            state.batch = (xm, ym)
            if full_idx is not None:
                state.batch_indices = full_idx[offset[0]:offset[0] + n]
            offset[0] += n
            loss = forward_loss(xm, ym)
            outputs.append(state.outputs.detach())
            for k, v in state.loss_terms.items():
                terms[k] = terms.get(k, 0.0) + v.detach() * (n / total)
            return loss

        parts = accumulated_backward(part_loss, bx, by, self.settings.micro_batches, state.create_graph)
        state.batch, state.batch_indices = full_batch, full_idx
        state.outputs = torch.cat(outputs)
        state.loss_terms = terms
        state.loss = sum(loss.detach() * (n / total) for n, loss in parts)


def _check_sequential(model: nn.Module) -> None:
    if not isinstance(model, nn.Sequential):
        raise ConfigError("client.microbatch.segments", f"activation checkpointing cuts an nn.Sequential model into "
                          f"segments, but the model is a {type(model).__name__}",
                          "set client.microbatch.segments = 0, or use a built-in model (all are Sequential)")
