"""The one local training loop every simulated and real client runs.

Data stay resident on the device as tensors; batches are index slices (no DataLoader on the hot path).
Plugins hook into the loop through :class:`~fedsim.clients.plugin_api.PluginStack` events; the
docstring of :class:`~fedsim.clients.plugin_api.Event` shows, as pseudo-code of :func:`train_local`,
where each event fires (keep the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsim.clients.plugin_api import Event, PluginStack, TrainState
from fedsim.config import ClientConfig


def make_optimizer(cfg: ClientConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
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
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    step_owner = plugins.owner.get("step")
    forward_owner = plugins.owner.get("forward")

    def forward_loss(bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        """BEFORE_FORWARD, forward, AFTER_FORWARD, loss terms, LOSS; the summed loss (also ``state.loss``)."""
        plugins.fire(Event.BEFORE_FORWARD, state)
        state.outputs = state.model(bx)
        plugins.fire(Event.AFTER_FORWARD, state)
        state.loss_terms = {"ce": state.loss_fn(state.outputs, by)}
        plugins.fire(Event.LOSS, state)
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
            plugins.fire(Event.BATCH, state)
            bx, by = state.batch
            if forward_owner is None:
                loss = forward_loss(bx, by)
                state.optimizer.zero_grad(set_to_none=True)
                loss.backward(create_graph=state.create_graph)
            else:
                if plugins.trace is not None:
                    plugins.trace.append(("forward_backward", forward_owner.name))
                forward_owner.forward_backward(state, forward_loss)
            plugins.fire(Event.AFTER_BACKWARD, state)
            plugins.fire(Event.BEFORE_STEP, state)
            if step_owner is not None:
                if plugins.trace is not None:
                    plugins.trace.append((Event.STEP.value, step_owner.name))
                step_owner.on(Event.STEP, state)
            else:
                state.optimizer.step()
            plugins.fire(Event.AFTER_STEP, state)
            with torch.no_grad():
                if by.shape[0]:
                    loss_sum += state.loss_terms["ce"].detach() * by.shape[0]
                correct += (state.outputs.argmax(1) == by).sum()
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
    metrics = {"train_loss": float(loss_sum) / seen, "train_accuracy": float(correct) / seen}
    metrics.update(state.metrics)
    return TrainResult(num_examples=n, steps=state.step, metrics=metrics)


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
