"""The one local training loop every simulated and real client runs.

Data stay resident on the device as tensors; batches are index slices (no DataLoader on the hot path).
Plugins hook into the loop through :class:`~fedsim.clients.plugin_api.PluginStack` events; the
docstring of :class:`~fedsim.clients.plugin_api.Event` shows, as pseudo-code of :func:`train_local`,
where each event fires (keep the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.clients.fast_sgd import FastSGD
from fedsim.clients.plugin_api import Event, PluginStack, TrainState
from fedsim.config import ClientConfig


def make_optimizer(cfg: ClientConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":  # torch.optim.SGD, bit for bit, minus its per-call wrappers
        return FastSGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class TrainResult:
    num_examples: int
    steps: int
    metrics: dict[str, float]


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ClientConfig,
    plugins: PluginStack,
    *,
    round: int,
    client_id: int,
    seed: int,
    rng: torch.Generator,
    config: dict[str, Any] | None = None,
    progress: float = 0.0,
    progress_span: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    probe_rng: torch.Generator | None = None,
) -> TrainResult:
    """Run ``cfg.epochs`` epochs (capped by ``cfg.max_steps``) of mini-batch training in place.

    ``progress`` is where the run stands when this round starts (0..1 over the federated run) and
    ``progress_span`` the share of the run one round spans; ``state.progress`` moves across the span
    step by step, so schedules never restart each round.

    Returns the number of examples (the FedAvg weight), local steps and the round's metrics
    (mean training loss and accuracy over the batches seen, plus plugin metrics ``plugin/key``).
    """
    model.train()
    opt = optimizer if optimizer is not None else make_optimizer(cfg, model.parameters())
    n = int(x.shape[0])
    per_epoch = -(-n // cfg.batch_size) if n else 0
    planned = per_epoch * cfg.epochs
    state = TrainState(
        model=model, optimizer=opt, loss_fn=nn.functional.cross_entropy, x=x, y=y,
        device=x.device, round=round, client_id=client_id, seed=seed, rng=rng,
        config=dict(config or {}), batch_size=cfg.batch_size, epochs=cfg.epochs,
        max_steps=cfg.max_steps, progress=progress, progress_span=progress_span,
        planned_steps=min(planned, cfg.max_steps) if cfg.max_steps else planned,
        probe_rng=probe_rng, create_graph="create_graph" in plugins.needs,
    )
    if "global_params" in plugins.needs:
        state.global_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    plugins.fire(Event.INIT, state)
    plugins.fire(Event.ROUND_START, state)
    tally = _Tally(x.device, defer=not plugins.plugins)
    step_owner = plugins.owner.get("step")
    forward_owner = plugins.owner.get("forward")
    # the per-step events, each a no-op where no plugin handles it
    on_batch, on_before_forward, on_after_forward, on_loss, on_after_backward, on_before_step, on_after_step = (
        plugins.hook(e) for e in (Event.BATCH, Event.BEFORE_FORWARD, Event.AFTER_FORWARD, Event.LOSS,
                                  Event.AFTER_BACKWARD, Event.BEFORE_STEP, Event.AFTER_STEP))

    def forward_loss(bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        """BEFORE_FORWARD, forward, AFTER_FORWARD, loss terms, LOSS; the summed loss (also ``state.loss``)."""
        on_before_forward(state)
        state.outputs = state.model(bx)
        on_after_forward(state)
        state.loss_terms = {"ce": state.loss_fn(state.outputs, by)}
        on_loss(state)
        state.loss = state.loss_terms["ce"] if len(state.loss_terms) == 1 else sum(state.loss_terms.values())
        return state.loss
    start = progress
    for epoch in range(state.epochs):
        state.epoch = epoch
        plugins.fire(Event.EPOCH_START, state)
        state.order = torch.randperm(n, generator=rng).to(x.device)
        state.batches = None
        plugins.fire(Event.SAMPLER, state)
        order, bs = state.order, state.batch_size
        batches = state.batches if state.batches is not None else \
            [order[s:s + bs] for s in range(0, int(order.shape[0]), bs)]
        for idx in batches:
            state.batch_indices = idx
            state.batch = (x[idx], y[idx])
            on_batch(state)
            bx, by = state.batch
            if forward_owner is None:
                loss = forward_loss(bx, by)
                state.optimizer.zero_grad(set_to_none=True)
                loss.backward(create_graph=state.create_graph)
            else:
                if plugins.trace is not None:
                    plugins.trace.append(("forward_backward", forward_owner.name))
                forward_owner.forward_backward(state, forward_loss)
            on_after_backward(state)
            on_before_step(state)
            if step_owner is not None:
                if plugins.trace is not None:
                    plugins.trace.append((Event.STEP.value, step_owner.name))
                step_owner.on(Event.STEP, state)
            else:
                state.optimizer.step()
            on_after_step(state)
            tally.add(state.loss_terms["ce"], state.outputs, by)
            state.samples_seen += int(by.shape[0])
            state.step += 1
            state.progress = start + progress_span * state.round_fraction()
            if state.stop or (state.max_steps and state.step >= state.max_steps):
                break
        plugins.fire(Event.EPOCH_END, state)
        if state.stop or (state.max_steps and state.step >= state.max_steps):
            break
    if plugins.has(Event.PROBE):
        _probe(plugins, state)
    plugins.fire(Event.ROUND_END, state)
    seen = max(state.samples_seen, 1)
    loss_sum, correct = tally.totals()
    metrics = {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}
    metrics.update(state.metrics)
    return TrainResult(num_examples=n, steps=state.step, metrics=metrics)


class _Tally:
    """The round's training loss and accuracy without a device sync or reduction per step.

    The loss is ``Σ loss·batch size`` as the float32 running sum ``loss_sum += loss * size`` in step
    order would give it, to the bit: the steps' losses are kept (detached) and summed at the end in one
    vectorised pass (float32 products, then a sequential float32 accumulation; losses of another dtype
    take the per-step operations themselves). Correct predictions are counted every :attr:`EVERY` steps
    over the kept outputs and labels (``argmax`` is row by row, so one call over the stacked rows is
    exact); with ``defer=False`` (plugins run, which might reuse those tensors) every step is counted
    at once. Nothing syncs with the device before :meth:`totals`.
    """

    EVERY = 32

    def __init__(self, device: torch.device, defer: bool) -> None:
        self.device = device
        self.every = self.EVERY if defer else 1
        self.counts: list[torch.Tensor] = []  # correct predictions of the steps counted so far
        self.losses: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.outputs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        if labels.shape[0]:  # an empty batch's loss is NaN and weighs nothing
            self.losses.append(loss.detach())
            self.sizes.append(labels.shape[0])
        self.outputs.append(outputs.detach())
        self.labels.append(labels)
        if len(self.outputs) >= self.every:
            self._count()

    def _count(self) -> None:
        if len(self.outputs) == 1:
            self.counts.append((self.outputs[0].argmax(1) == self.labels[0]).sum())
        elif self.outputs:
            self.counts.append((torch.cat(self.outputs).argmax(1) == torch.cat(self.labels)).sum())
        self.outputs, self.labels = [], []

    def _loss_sum(self) -> float:
        if not self.losses:
            return 0.0
        if torch.get_default_dtype() == torch.float32 and all(  # the running sum's dtype, as it always was
                t.dtype == torch.float32 and t.dim() == 0 for t in self.losses):
            products = torch.stack(self.losses).cpu().numpy() * np.asarray(self.sizes, dtype=np.float32)
            return float(np.add.accumulate(np.concatenate((np.zeros(1, np.float32), products)))[-1])
        total = torch.zeros((), device=self.device)
        for loss, size in zip(self.losses, self.sizes):
            total += loss * size
        return float(total)

    def totals(self) -> tuple[float, int]:
        """``(Σ loss·batch size, correct predictions)`` over every step added."""
        self._count()
        counts = self.counts
        correct = int(counts[0]) if len(counts) == 1 else int(torch.stack(counts).sum()) if counts else 0
        return self._loss_sum(), correct


def _probe(plugins: PluginStack, state: TrainState) -> None:
    """Fire ``PROBE`` so that it cannot change training: parameters, buffers, the training RNG and
    the mode are restored afterwards and gradients cleared (probes use ``state.probe_rng``)."""
    model = state.model
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    rng_state = state.rng.get_state()
    was_training = model.training
    if state.probe_rng is None:
        state.probe_rng = torch.Generator(device="cpu").manual_seed(state.seed ^ 0x5EED)
    try:
        with torch.enable_grad():
            plugins.fire(Event.PROBE, state)
    finally:
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                v.copy_(saved[k])
        model.zero_grad(set_to_none=True)
        state.rng.set_state(rng_state)
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    loss = 0.0
    correct = 0
    for start in range(0, int(x.shape[0]), batch_size):
        out = model(x[start:start + batch_size])
        yy = y[start:start + batch_size]
        loss += float(nn.functional.cross_entropy(out, yy, reduction="sum"))
        correct += int((out.argmax(1) == yy).sum())
    n = max(int(x.shape[0]), 1)
    return {"loss": loss / n, "accuracy": correct / n}
