"""Vectorised ``fit``: many clients' local SGD steps in one batched call (DESIGN.md §5).

The per-message path runs the plain ``fit`` task once per client: decode the arrays, reload the
model, build an optimizer, loop over mini-batches, encode the reply. For many small clients that
fixed cost dominates the compute. :class:`BatchedFit` instead takes every eligible ``train``
message of one push, stacks the clients' parameters along a leading client dimension and runs
all their local steps together, with per-client SGD momentum buffers, then builds per-client replies
with the same content as ``fit``. Models that :func:`~fedsim.clients.batched_stacked.stacked_plan`
verifies (plain ``nn.Sequential`` of ``Linear``, ``Flatten`` and elementwise activations: fedsim's
``mlp`` and ``logreg``) run as ``torch.baddbmm`` over the stacked parameters with one plain backward
pass (``clients/batched_stacked.py``: no ``torch.func``, so no ``torch._dynamo`` import); any other
model runs through ``torch.func.functional_call`` + ``torch.vmap`` (per-client gradients via
``torch.func.grad_and_value``).

What is reproduced per client, exactly as :func:`fedsim.clients.trainer.train_local` does it:

* the sample order: the same ``torch.Generator`` (``torch_generator(seed, "train", round, pid)``)
  and the same ``torch.randperm(n)`` draw per epoch;
* the batches: ``order[s:s + batch_size]``, so a short last batch per epoch; ``epochs`` and the
  ``max_steps`` cap give each client its own number of steps ``min(epochs·⌈n/bs⌉, max_steps)``;
* the loss: mean cross-entropy over the batch's *real* samples (short batches are padded and
  masked); clients that have finished are sliced out of later steps (clients are sorted by step
  count), so their parameters and momentum are untouched;
* SGD (``torch.optim.SGD`` semantics: weight decay added to the gradient, momentum buffer
  ``b ← m·b + g`` starting from the first gradient, ``p ← p − lr·b``);
* the reply: ``arrays`` (the full state dict as NumPy arrays) and ``metrics`` with
  ``partition-id``, ``num-examples``, ``steps``, ``sim-time``, ``train_loss``, ``train_accuracy``
  accumulated in float32 per batch as the loop does (and ``label-counts`` for private runs with
  ``privacy.release_counters``, as ``fit`` adds them). ``tests/clients/test_batched.py`` compares
  the reply keys with ``fit``'s, so a change to ``fit``'s reply must be mirrored here.

The local engine uses this path by default (``run.vectorize = "auto"``; ``true`` also vectorises
convolutional models on CPU, ``false`` never vectorises). It is deterministic for a scenario and
seed, but the batched kernels (``bmm`` instead of ``mm``, grouped convolutions, a masked sum instead
of ``mean``) round differently, so parameters agree with the per-client path to float32 rounding
(≈1e-7 relative per step, measured ≤1e-6 absolute after a round in the tests), not bit for bit;
``train_accuracy`` can differ when two logits tie to within rounding. Why clients ran one by one is
logged once and counted in :meth:`BatchedFit.summary` (``summary.json``: ``vectorized``).

Eligibility (anything else goes through the normal per-message path, client by client): message
type ``train`` (the plain ``fit`` task) carrying ``arrays``; no client plugins (neither
``client.plugins`` nor the strategy's ``client_plugins``); ``client.optimizer = "sgd"``; no
DP-SGD; a model without buffers, BatchNorm/InstanceNorm or Dropout; no fault that touches the
client this round (crash, dropout, Byzantine); received arrays that match the model's parameters;
client data with the common sample shape. With ``when="faster"`` (``run.vectorize = "auto"``)
convolutional models are left to the per-message path on CPU, where their vectorised form is slower
(:func:`cost_reason`).
A failure of the vectorised call itself (e.g. an
operator ``vmap`` cannot batch) sends its clients back to the per-message path, which then
reports any real error per client.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from torch import nn

from fedsim.clients.batched_stacked import stacked_plan, stacked_step
from fedsim.clients.tasks import CLIENT_TASKS, PLUGINS_KEY, ClientCall, fit, fit_reply
from fedsim.clients.runtime import ClientRuntime, runtime_for
from fedsim.config import Scenario
from fedsim.errors import ClientFailure
from fedsim.faults import is_byzantine
from fedsim.wire import array_record, from_numpy

#: memory the stacked parameters, momentum, gradients and gathered batches of one chunk may use
CHUNK_BYTES = 256 * 2**20
#: most clients in one vectorised call
MAX_CHUNK = 256
#: ``run.vectorize`` → ``BatchedFit(when=...)`` (``False``: no batcher at all)
WHEN_FOR_SETTING = {"auto": "faster", True: "eligible"}

_LOG = logging.getLogger("flwr")  # where the server logs its progress

_STATEFUL = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def model_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained vectorised (``None`` if it can)."""
    for name, m in model.named_modules():
        if isinstance(m, _STATEFUL):
            return f"module '{name}' is {type(m).__name__} (running statistics or randomness)"
    if any(True for _ in model.buffers()):
        return "the model has buffers"
    if not all(p.dtype.is_floating_point for p in model.parameters()):
        return "the model has non-floating-point parameters"
    return None


_CONV = (nn.modules.conv._ConvNd,)


def cost_reason(model: nn.Module, device: torch.device) -> str | None:
    """Why vectorising ``model`` would not pay off on ``device`` (``None`` if it does).

    Under ``vmap`` a convolution with per-client weights becomes a grouped convolution, which
    CPU kernels run slower than the clients' separate convolutions (measured ≈1.1-1.5× the compute
    of the per-client loop on the few-CNN benchmark, more than the per-client overhead saved), so
    convolutional models are vectorised on accelerators only.
    """
    if device.type == "cpu" and any(isinstance(m, _CONV) for m in model.modules()):
        return "convolutions under vmap (grouped convolutions) are slower than per-client calls on CPU"
    return None


def scenario_reason(scenario: Scenario, model: nn.Module) -> str | None:
    """Why no client of ``scenario`` can use the vectorised path (``None`` if they can)."""
    c = scenario.client
    if c.plugins:
        return f"client plugins {list(c.plugins)} are enabled"
    if c.optimizer != "sgd":
        return f"client.optimizer is '{c.optimizer}' (only sgd is vectorised)"
    if scenario.privacy.mechanism == "dp-sgd":
        return "DP-SGD clips per example in the local loop"
    if CLIENT_TASKS.get("fit") is not fit:
        return "the 'fit' client task was replaced"
    return model_reason(model)


def message_reason(call: ClientCall) -> str | None:
    """Why this message cannot join a vectorised call (``None``: plain ``train``, no fault this round)."""
    if call.msg.metadata.message_type != "train":
        return f"message type '{call.msg.metadata.message_type}'"
    if not isinstance(call.msg.content.get("arrays"), ArrayRecord):  # (``.array_records`` is rebuilt per access)
        return "the message carries no 'arrays' record"
    if call.config.get(PLUGINS_KEY):  # a plugin the strategy enables (e.g. FedLD's margin loss)
        return f"the strategy enables client plugins ({call.config.get(PLUGINS_KEY)})"
    if is_byzantine(call.scenario, call.partition_id):
        return "a Byzantine client (faults.byzantine_clients)"
    try:
        call.apply_faults()  # crash / dropout: the per-message path raises them (same draws)
    except (ClientFailure, SystemExit):  # SystemExit: faults.crash_mode = "exit" (the node dies there)
        return "a fault (crash or dropout) hits the client this round"
    return None


def message_eligible(call: ClientCall) -> bool:
    """Whether this message can join a vectorised call (:func:`message_reason` is ``None``)."""
    return message_reason(call) is None


@dataclass
class _Client:
    call: ClientCall
    x: torch.Tensor
    y: torch.Tensor
    init: dict[str, torch.Tensor]
    steps: int


class BatchedFit:
    """Runs the eligible ``train`` messages of one push as vectorised calls (see the module doc)."""

    def __init__(self, scenario: Scenario, *, chunk_bytes: int = CHUNK_BYTES, max_chunk: int = MAX_CHUNK,
                 when: str = "faster") -> None:
        """``when="faster"`` skips models that :func:`cost_reason` says would run slower;
        ``when="eligible"`` vectorises every eligible client (tests, accelerator studies)."""
        if when not in ("faster", "eligible"):
            raise ValueError(f"when must be 'faster' or 'eligible', got {when!r}")
        self.scenario = scenario
        self.chunk_bytes = chunk_bytes
        self.max_chunk = max_chunk
        self.when = when
        self._reason: str | None | bool = False  # False = not computed yet
        self._plugins_checked = False
        self._warned = False
        self._logged = False
        self.calls = 0  # vectorised calls made (for tests and benchmarks)
        self.stacked_calls = 0  # of which through the stacked path (batched_stacked.py), not vmap
        self._layers: list | None | bool = False  # the stacked plan (False = not computed yet)
        self.clients = 0  # clients trained by them
        #: train messages left to the per-message path, by reason
        self.fallbacks: Counter[str] = Counter()

    @property
    def runtime(self) -> ClientRuntime:
        return runtime_for(self.scenario)

    def reason(self) -> str | None:
        """Why the scenario cannot use the vectorised path at all (``None`` if it can)."""
        if self._reason is False:
            rt = self.runtime
            self._reason = scenario_reason(self.scenario, rt.model)
            if self._reason is None and self.when == "faster":
                self._reason = cost_reason(rt.model, rt.device)
        return self._reason  # type: ignore[return-value]

    def summary(self) -> dict:
        """What ``summary.json`` records as ``vectorized``: whether any client was trained here, why
        not (the scenario-wide reason, else the commonest per-client one) and the counts."""
        reason = self._reason if isinstance(self._reason, str) else None
        if reason is None and not self.clients:
            reason = (self.fallbacks.most_common(1)[0][0] if self.fallbacks
                      else "no push held two or more train messages")
        return {"used": self.clients > 0, "reason": reason, "when": self.when, "calls": self.calls,
                "stacked_calls": self.stacked_calls, "vmap_calls": self.calls - self.stacked_calls,
                "clients_batched": self.clients, "clients_per_client": sum(self.fallbacks.values()),
                "per_client_reasons": dict(self.fallbacks.most_common(8))}

    def _log_reason_once(self, num_train: int) -> None:
        if self._logged or not isinstance(self._reason, str):
            return
        self._logged = True
        level = logging.WARNING if self.when == "eligible" else logging.INFO  # asked for explicitly: warn
        _LOG.log(level, "fedsim: run.vectorize: clients train one by one, because %s", self._reason)
        self.fallbacks[self._reason] += num_train

    def run(self, items: list[tuple[Message, Context]]) -> list[RecordDict | None]:
        """Reply contents for ``items`` (``None`` = not handled here: use the per-message path)."""
        out: list[RecordDict | None] = [None] * len(items)
        num_train = sum(m.metadata.message_type.startswith("train") for m, _ in items)
        if not items or self.reason() is not None:
            if self._logged:
                self.fallbacks[self._reason] += num_train  # type: ignore[index]
            self._log_reason_once(num_train)
            return out
        runtime = self.runtime
        clients: list[tuple[int, _Client]] = []
        decoded: dict[int, dict[str, torch.Tensor] | None] = {}
        for i, (msg, ctx) in enumerate(items):
            kind = msg.metadata.message_type
            if kind != "train":
                if kind.startswith("train"):  # another training task (e.g. a gradient query)
                    self.fallbacks[f"message type '{kind}' is not the plain fit task"] += 1
                continue
            call = ClientCall(runtime, msg, ctx)
            if not self._plugins_checked:  # once: the plugin stack the per-message path would build
                self._plugins_checked = True
                stack = call.plugins()
                if len(stack):
                    self._reason = f"the client loop gets plugins {[p.name for p in stack.plugins]}"
            if self._reason is not None:
                self._log_reason_once(num_train)
                return out
            why = message_reason(call)
            if why is None:
                arrays = msg.content["arrays"]
                if id(arrays) not in decoded:
                    decoded[id(arrays)] = self._params_of(arrays)
                init = decoded[id(arrays)]
                why = "the received arrays do not match the model's parameters" if init is None else None
            if why is None:
                try:
                    x, y = call.data()
                except Exception:  # noqa: BLE001 - the per-message path reports it as this client's error
                    why = "the client's data could not be loaded"
            if why is not None:
                self.fallbacks[why] += 1
                continue
            clients.append((i, _Client(call, x, y, init, self._num_steps(int(x.shape[0])))))
        if not clients:
            return out
        shape = tuple(clients[0][1].x.shape[1:])
        fits = [tuple(c.x.shape[1:]) == shape and c.y.dim() == 1 and c.y.shape[0] == c.x.shape[0]
                and c.x.dtype == clients[0][1].x.dtype for _, c in clients]
        if not all(fits):
            self.fallbacks["the client's samples differ in shape or type from the others'"] += fits.count(False)
        clients = [ic for ic, ok in zip(clients, fits) if ok]
        # longest first: at step t the clients still training are a prefix of the chunk
        clients.sort(key=lambda ic: -ic[1].steps)
        for chunk in self._chunks(clients):
            try:
                replies = self._train_chunk([c for _, c in chunk])
            except Exception as exc:  # noqa: BLE001 - fall back; a real client error shows up there
                if not self._warned:
                    warnings.warn(f"vectorised fit failed ({type(exc).__name__}: {exc}); "
                                  "these clients run one by one", RuntimeWarning, stacklevel=2)
                    self._warned = True
                self.fallbacks[f"the vectorised call failed ({type(exc).__name__})"] += len(chunk)
                continue
            self.calls += 1
            self.clients += len(chunk)
            for (i, _), content in zip(chunk, replies):
                out[i] = content
        return out

    # ------------------------------------------------------------------ helpers
    def _params_of(self, arrays: ArrayRecord) -> dict[str, torch.Tensor] | None:
        """The received tensors if they match the model's parameters exactly (else ``None``)."""
        runtime = self.runtime
        try:
            tensors = runtime.decoded(arrays)
        except Exception:  # noqa: BLE001 - the per-message path reports a bad record
            return None
        params = dict(runtime.model.named_parameters())
        if len(tensors) != len(params) or set(tensors) != set(params):  # (the model has no buffers)
            return None
        out = {}
        for k, p in params.items():
            t = tensors[k]
            if tuple(t.shape) != tuple(p.shape) or not (t.dtype.is_floating_point or t.dtype == p.dtype):
                return None
            out[k] = t.to(device=p.device, dtype=p.dtype)
        return out

    def _num_steps(self, n: int) -> int:
        c = self.scenario.client
        steps = c.epochs * math.ceil(n / c.batch_size)
        return min(steps, c.max_steps) if c.max_steps else steps

    def _chunks(self, clients: list) -> list[list]:
        if not clients:
            return []
        bs = self.scenario.client.batch_size
        n_params = sum(p.numel() for p in self.runtime.model.parameters())
        feat = math.prod(clients[0][1].x.shape[1:])
        per_client = 4 * (5 * n_params + (clients[0][1].steps + 1) * bs * (feat + 2))
        size = max(1, min(self.max_chunk, self.chunk_bytes // max(per_client, 1)))
        return [clients[s:s + size] for s in range(0, len(clients), size)]

    def _orders(self, clients: list[_Client], client_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Global sample indices ``[T, B, C]`` (``[T, C, B]`` if ``client_major``; padding → 0) and the
        mask of real samples."""
        c = self.scenario.client
        bs = c.batch_size
        big_t = max((cl.steps for cl in clients), default=0)
        # no batch is wider than the largest client: pad to that, not to a large batch_size
        width = min(bs, max((int(cl.x.shape[0]) for cl in clients), default=1))
        # built in NumPy (a few µs per small op, against ≈10 µs for a torch op), per client
        idx = np.zeros((len(clients), big_t, width), dtype=np.int64)
        real = np.zeros((len(clients), big_t, width), dtype=bool)
        offset = 0
        for j, cl in enumerate(clients):
            n = int(cl.x.shape[0])
            if cl.steps:
                per_epoch = math.ceil(n / bs)
                rng = cl.call.rng("train")
                epochs = math.ceil(cl.steps / per_epoch)
                o = np.full((epochs, per_epoch * bs), -1, dtype=np.int64)
                for e in range(epochs):
                    o[e, :n] = torch.randperm(n, generator=rng).numpy()
                o = o.reshape(epochs * per_epoch, bs)[:cl.steps, :width]  # (positions ≥ width are padding)
                ok = o >= 0
                idx[j, :cl.steps] = np.where(ok, o + offset, 0)
                real[j, :cl.steps] = ok
            offset += n
        # [T, B, C]: a step's batch is gathered sample-major, so vmap's grouped convolutions see
        # contiguous ``[B, C·channels, H, W]`` inputs; [T, C, B] for the stacked path's ``bmm``
        dims = (1, 0, 2) if client_major else (1, 2, 0)
        return (torch.from_numpy(np.ascontiguousarray(idx.transpose(dims))),
                torch.from_numpy(np.ascontiguousarray(real.transpose(dims))))

    def stacked_layers(self) -> list | None:
        """The model's stacked plan (``batched_stacked.py``), or ``None``: the chunks run under ``vmap``."""
        if self._layers is False:
            self._layers, _ = stacked_plan(self.runtime.model)
        return self._layers  # type: ignore[return-value]

    def _train_chunk(self, clients: list[_Client]) -> list[RecordDict]:
        runtime = self.runtime
        model = runtime.model
        cfg = self.scenario.client
        device = clients[0].x.device
        names = [k for k, _ in model.named_parameters()]
        num = len(clients)
        params = [torch.stack([cl.init[k] for cl in clients]).to(device) for k in names]
        bufs = [torch.zeros_like(p) for p in params] if cfg.momentum else []
        x_all = torch.cat([cl.x for cl in clients])
        y_all = torch.cat([cl.y for cl in clients])
        layers = self.stacked_layers()
        idx, real = self._orders(clients, client_major=layers is not None)
        seen = real.sum((0, 2 if layers is not None else 1)).tolist()  # real samples per client, all steps
        idx, real = idx.to(device), real.to(device)
        steps = torch.tensor([cl.steps for cl in clients])
        active = [int((steps > t).sum()) for t in range(idx.shape[0])]  # a prefix (sorted by steps)
        loss_sum = torch.zeros(num, device=device)
        correct = torch.zeros(num, device=device, dtype=torch.long)

        def client_loss(p: tuple[torch.Tensor, ...], x, y, m, cnt):
            out = torch.func.functional_call(model, dict(zip(names, p)), (x,))
            ce = nn.functional.cross_entropy(out, y, reduction="none")
            loss = (ce * m).sum() / cnt
            return loss, out

        step_fn = None if layers is not None else \
            torch.vmap(torch.func.grad_and_value(client_loss, has_aux=True), in_dims=(0, 1, 1, 1, 0))
        lr, mom, wd = cfg.lr, cfg.momentum, cfg.weight_decay
        was_training = model.training
        model.train()
        try:
            for t, k in enumerate(active):
                if k == 0:
                    break
                ps = [p[:k] for p in params]
                if step_fn is None:  # stacked: [k, B] rows, [k, B, classes] logits
                    rows, mask = idx[t, :k], real[t, :k]
                    xb, yb = x_all[rows], y_all[rows]
                    cf = mask.sum(1).to(x_all.dtype)
                    grads, loss, out = stacked_step(layers, ps, xb, yb, mask.to(x_all.dtype), cf)
                else:  # vmap: [B, k] rows (sample-major), [k, B, classes] logits
                    rows, mask = idx[t, :, :k], real[t, :, :k]
                    xb, yb = x_all[rows], y_all[rows]
                    cf = mask.sum(0).to(x_all.dtype)
                    grads, (loss, out) = step_fn(tuple(ps), xb, yb, mask.to(x_all.dtype), cf)
                    grads, yb, mask = list(grads), yb.t(), mask.t()
                if wd:
                    grads = torch._foreach_add(grads, ps, alpha=wd)
                if mom:
                    bs_ = [b[:k] for b in bufs]
                    torch._foreach_mul_(bs_, mom)
                    torch._foreach_add_(bs_, grads)
                    grads = bs_
                torch._foreach_add_(ps, grads, alpha=-lr)
                with torch.no_grad():
                    loss_sum[:k] += loss.detach() * cf
                    correct[:k] += ((out.argmax(-1) == yb) & mask).sum(1)
        finally:
            model.train(was_training)
        self.stacked_calls += step_fn is None
        cpu = [p.detach().cpu() for p in params]
        losses, rights = loss_sum.cpu().tolist(), correct.cpu().tolist()
        keys = list(model.state_dict())
        replies = []
        for j, cl in enumerate(clients):
            arrays = array_record({k: from_numpy(cpu[names.index(k)][j].numpy()) for k in keys})
            s = max(seen[j], 1)
            replies.append(fit_reply(cl.call, arrays, cl.y, int(cl.x.shape[0]), cl.steps,
                                     {"train_loss": losses[j] / s, "train_accuracy": float(rights[j]) / s}))
        return replies


def batcher_for(scenario: Scenario) -> BatchedFit | None:
    """The local engine's batcher for ``run.vectorize`` (``None`` for ``false``)."""
    when = WHEN_FOR_SETTING.get(scenario.run.vectorize)
    return None if when is None else BatchedFit(scenario, when=when)


__all__ = ["BatchedFit", "WHEN_FOR_SETTING", "batcher_for", "cost_reason", "message_eligible",
           "message_reason", "model_reason", "scenario_reason"]
