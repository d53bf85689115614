"""SemiFL: a labelled server and unlabelled clients, trained alternately.

Diao, Ding, Tarokh. "SemiFL: Semi-Supervised Federated Learning for Unlabeled Clients with
Alternate Training", NeurIPS 2022 (arXiv 2106.01432); reference code diaoenmao/SemiFL-...

One round (the reference's order):

1. The server sends w_t whose BatchNorm buffers hold static-BN statistics (sBN: one train-mode pass
   averaging batch means and unbiased batch variances over the server's labelled data and the
   sampled clients' data; clients answer ``train.semifl_bn``).
2. Each client pseudo-labels its data once with w_t (eval mode, one weak view): ``ŷ = argmax p``,
   confident where ``max p >= tau``. No confident sample → the client sits the round out.
3. Client training on the confident ("fix") set with strong augmentation, plus mixup against random
   local samples: ``CE(f(A(x_fix)), ŷ_fix) + lam·[l CE(f(x_mix), ŷ_fix) + (1-l) CE(f(x_mix), ŷ_rand)]``,
   ``l ~ Beta(alpha, alpha)``; SGD (momentum 0.9, Nesterov, weight decay 5e-4), gradients clipped to 1.
   It runs on the one plugin loop (``train_local`` with :class:`SemiFLClientStep`), so client plugins
   such as ``barlow_twins`` and ``mixtrain`` compose with it.
4. Server: unweighted mean of the client models on weights and biases only (BN buffers excluded),
   global SGD step with lr 1 and momentum ``global_momentum`` (persisting across rounds).
5. Server fine-tuning on its labelled data (``server_epochs``, weak augmentation, same optimiser,
   its state persisting across rounds).

``server_only = true`` gives the partially supervised baseline (the server trains alone). Images
only: the augmentations are written in torch on (N, C, H, W) tensors (``fedsim.clients.augment``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedsim.clients.augment import mixup, sample_beta, strong_augment, weak_augment
from fedsim.clients.plugin_api import ClientPlugin, Event, PluginStack, TrainState
from fedsim.clients.tasks import CLIENT_TASKS, ClientCall
from fedsim.clients.trainer import train_local
from fedsim.errors import ConfigError
from fedsim.rng import torch_generator
from fedsim.strategies.base import FedSimStrategy, register_strategy
from fedsim.strategies.semifl_math import ServerMomentum, is_averaged_key, pseudo_label
from fedsim.wire import from_numpy, state_to_arrays, to_numpy


def _sgd(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def _bn_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def bn_batch_sums(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 250) -> dict[str, list]:
    """Per BN layer: (Σ_b batch mean, Σ_b unbiased batch var, number of batches), one train-mode pass."""
    layers = _bn_layers(model)
    sums: dict[str, list] = {n: [0.0, 0.0, 0] for n, _ in layers}
    hooks = []
    for name, layer in layers:
        def hook(mod, inp, _out, _n=name):
            a = inp[0].transpose(0, 1).reshape(inp[0].shape[1], -1)
            sums[_n][0] = sums[_n][0] + a.mean(1)
            sums[_n][1] = sums[_n][1] + a.var(1, unbiased=True)
            sums[_n][2] += 1
        hooks.append(layer.register_forward_hook(hook))
    was = model.training
    model.train()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for s in range(0, int(x.shape[0]), batch_size):
            if x[s:s + batch_size].shape[0] > 1:
                model(x[s:s + batch_size])
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict(saved)
        model.train(was)
    return sums


def apply_bn_statistics(model: torch.nn.Module, sums: list[dict[str, list]]) -> None:
    """Set every BN layer's running stats to the average of batch means / variances over all passes."""
    for name, layer in _bn_layers(model):
        total_mean = sum(s[name][0] for s in sums if s[name][2])
        total_var = sum(s[name][1] for s in sums if s[name][2])
        batches = sum(s[name][2] for s in sums)
        if batches:
            layer.running_mean.copy_(torch.as_tensor(total_mean) / batches)
            layer.running_var.copy_(torch.as_tensor(total_var) / batches)


def crop_padding(x: torch.Tensor) -> int:
    """Reflect padding of the weak random crop: 4 px on 32-px images (the reference), scaled with size."""
    return max(1, int(x.shape[-1]) // 8)


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ConfigError("data.dataset", f"SemiFL augments images (N, C, H, W); this data has shape "
                          f"{tuple(x.shape)}", "use an image dataset such as digits or synthetic_images")


class SemiFLClientStep(ClientPlugin):
    """SemiFL's client objective on the one plugin loop (internal: not registered, added by the task).

    The loop trains on the confident ("fix") samples with their pseudo-labels. At ``BATCH`` this
    plugin draws the mixup partners (random local samples) and replaces the batch with its strong
    view ``A(alpha(x))``, so the loop's ``"ce"`` term is ``CE(f(A(x_fix)), y_fix)``; at ``LOSS`` it adds
    ``lam * [l CE(f(x_mix), y_fix) + (1-l) CE(f(x_mix), y_rand)]`` as ``"semifl_mix"``; before the step
    it clips the gradient norm to 1. Its draws come from the loop's RNG in the reference order, so the
    task trains exactly as SemiFL's own loop did. Other plugins (``barlow_twins``, ``mixtrain``) run
    after it on the same loop.
    """

    name = "semifl_client"
    events = frozenset({Event.BATCH, Event.LOSS, Event.BEFORE_STEP, Event.AFTER_STEP})

    def __init__(self, x_all: torch.Tensor, yhat_all: torch.Tensor, lam: float, alpha: float, flip: bool,
                 padding: int) -> None:
        super().__init__()
        self.x_all, self.yhat_all = x_all, yhat_all
        self.lam, self.alpha, self.flip, self.padding = lam, alpha, flip, padding
        self.loss_sum, self.steps = 0.0, 0
        self._raw: torch.Tensor | None = None
        self._partners: torch.Tensor | None = None

    def _weak(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return weak_augment(x, gen, flip=self.flip, padding=self.padding)

    def on(self, event: Event, state: TrainState) -> None:
        gen = state.rng
        if event is Event.BATCH:
            xb, yb = state.batch
            n = int(self.x_all.shape[0])
            self._partners = torch.randint(0, n, (int(yb.numel()),), generator=gen).to(yb.device)
            self._raw = xb
            state.batch = (strong_augment(self._weak(xb, gen), gen, weak_first=False), yb)
        elif event is Event.LOSS and self.lam:
            lm = float(sample_beta(gen, self.alpha))
            rnd = self._partners
            x_mix = mixup(self._weak(self._raw, gen), self._weak(self.x_all[rnd], gen), lm)
            out = state.model(x_mix)
            yb = state.batch[1]
            state.add_loss("semifl_mix", self.lam * (lm * F.cross_entropy(out, yb)
                                                     + (1 - lm) * F.cross_entropy(out, self.yhat_all[rnd])))
        elif event is Event.BEFORE_STEP:
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
        elif event is Event.AFTER_STEP:
            self.loss_sum += float(state.loss.detach())
            self.steps += 1


@CLIENT_TASKS.register("semifl")
def semifl_client(call: ClientCall) -> RecordDict:
    """Pseudo-label once with the received model, then fix + mix training on the plugin loop.

    The client's own plugins (``client.plugins``, e.g. ``barlow_twins`` or ``mixtrain``) run on the same
    loop after :class:`SemiFLClientStep`, with the pseudo-labels as the batch labels. ``client.max_steps``
    caps the local steps of the round over all epochs (the loop's rule).
    """
    c = call.config
    model = call.load_global()
    x, _unused_labels = call.data()  # clients are unlabelled: their labels are never read
    _check_images(x)
    gen = call.rng("semifl")
    flip = bool(c.get("semifl-flip", False))
    pad = crop_padding(x)
    model.eval()
    with torch.no_grad():
        probs = torch.cat([F.softmax(model(weak_augment(x[s:s + 500], gen, flip=flip, padding=pad)), 1)
                           for s in range(0, int(x.shape[0]), 500)])
    mask, yhat = pseudo_label(probs, float(c["semifl-tau"]))
    fix = torch.nonzero(mask).flatten()
    if fix.numel() == 0:
        return RecordDict({"metrics": call.reply_metrics(**{"sat-out": 1, "num-examples": 1, "mask-rate": 0.0})})
    step = SemiFLClientStep(x, yhat, float(c["semifl-lambda"]), float(c["semifl-alpha"]), flip, pad)
    own = call.plugins()
    stack = PluginStack([step, *own.plugins])
    stack.first_visit = set(own.first_visit)
    opt = _sgd(model.parameters(), float(c["semifl-lr"]), float(c["semifl-weight-decay"]))
    res = train_local(model, x[fix], yhat[fix], call.scenario.client, stack, round=call.round,
                      client_id=call.partition_id, seed=call.scenario.run.seed, rng=gen, config=c,
                      progress=call.progress(), progress_span=call.progress_span(), optimizer=opt,
                      probe_rng=call.probe_rng(stack))
    call.save_plugins(own)
    n = int(x.shape[0])
    plugin_metrics = {k: v for k, v in res.metrics.items() if "/" in k}
    metrics = call.reply_metrics(**{"num-examples": int(fix.numel()), "mask-rate": fix.numel() / n,
                                    "train_loss": step.loss_sum / max(step.steps, 1), "steps": res.steps,
                                    "sim-time": call.simulated_time(res.steps)}, **plugin_metrics)
    return RecordDict({"arrays": state_to_arrays(model), "metrics": metrics})


@CLIENT_TASKS.register("semifl_bn")
def semifl_bn_client(call: ClientCall) -> RecordDict:
    """Static-BN statistics of the received model on this client's data (sums over batches)."""
    model = call.load_global()
    x, _ = call.data()
    sums = bn_batch_sums(model, x)
    arrays = {}
    counts = {}
    for name, (m, v, b) in sums.items():
        if b:
            arrays[f"{name}.mean_sum"] = m.detach().cpu().numpy()
            arrays[f"{name}.var_sum"] = v.detach().cpu().numpy()
        counts[f"{name}.batches"] = int(b)
    return RecordDict({"bn": ArrayRecord({k: from_numpy(a) for k, a in arrays.items()}),
                       "metrics": call.reply_metrics(**{"num-examples": int(x.shape[0])}, **counts)})


@register_strategy
class SemiFL(FedSimStrategy):
    name = "semifl"
    train_action = "train.semifl"
    tiny_overrides = ("data.server_labelled=40", "strategy.tau=0.0", "strategy.server_epochs=1")

    @dataclass(frozen=True)
    class Options:
        tau: float = 0.95
        lam: float = 1.0
        alpha: float = 0.75
        global_momentum: float = 0.5
        server_epochs: int = 5
        server_batch_size: int = 0  # 0: 10 if the labelled set has <= 1000 samples, else 250
        lr: float = 0.03
        weight_decay: float = 5e-4
        flip: bool = False
        sbn: bool = True
        server_only: bool = False

        def __post_init__(self) -> None:
            if not 0 <= self.tau:
                raise ValueError("tau must be >= 0 (tau > 1 makes every client sit out)")
            if self.alpha <= 0 or self.lr <= 0 or self.server_epochs < 0:
                raise ValueError("alpha and lr must be > 0 and server_epochs >= 0")
            if not 0 <= self.global_momentum < 1:
                raise ValueError("global_momentum must lie in [0, 1)")

    def __init__(self, scenario, options=None) -> None:
        super().__init__(scenario, options)
        if scenario.data.server_labelled <= 0:
            raise ConfigError("data.server_labelled", "SemiFL needs labelled data on the server",
                              "set data.server_labelled, e.g. 100")
        self.momentum = ServerMomentum(lr=1.0, momentum=self.options.global_momentum)
        self.server = None
        self._server_opt: torch.optim.Optimizer | None = None

    def attach_server(self, server) -> None:
        """Called by the server loop with the runtime holding the model and the labelled split."""
        super().attach_server(server)
        self.server = server
        x, y = server.federation.server_data()
        self.xs = torch.tensor(np.asarray(x), dtype=torch.float32, device=server.device)
        self.ys = torch.tensor(np.asarray(y), dtype=torch.long, device=server.device)
        _check_images(self.xs)

    # -------------------------------------------------------------------------------------------
    def train_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        o = self.options
        return {"semifl-tau": float(o.tau), "semifl-lambda": float(o.lam), "semifl-alpha": float(o.alpha),
                "semifl-lr": float(o.lr), "semifl-weight-decay": float(o.weight_decay), "semifl-flip": bool(o.flip)}

    def sample(self, server_round, grid, fraction=None):
        if self.options.server_only and fraction is None:
            return []  # the partially supervised baseline: the server trains alone
        return super().sample(server_round, grid, fraction)

    def before_send(self, server_round, msgs, grid):
        """Static BN: the model sent carries BN statistics of the server's and the sampled clients' data."""
        if msgs and self.options.sbn and self.server is not None and _bn_layers(self.server.model):
            arrays = self._static_bn(server_round, msgs[0].content["arrays"], grid,
                                     [m.metadata.dst_node_id for m in msgs])
            for m in msgs:
                m.content["arrays"] = arrays
        return msgs

    def _static_bn(self, server_round, arrays, grid, nodes):
        model = self.server.load(arrays)
        sums = [bn_batch_sums(model, self.xs)]
        cfg = ConfigRecord({"server-round": server_round})
        ask = [Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=n, message_type="train.semifl_bn")
               for n in nodes]
        for r in grid.send_and_receive(ask, timeout=self.timeout):
            if r.has_error():
                continue
            bn, met = r.content.array_records.get("bn"), r.content.metric_records["metrics"]
            one = {}
            for name, _ in _bn_layers(model):
                b = int(met.get(f"{name}.batches", 0))
                if b and bn is not None and f"{name}.mean_sum" in bn:
                    one[name] = [torch.from_numpy(to_numpy(bn[f"{name}.mean_sum"]).copy()),
                                 torch.from_numpy(to_numpy(bn[f"{name}.var_sum"]).copy()), b]
                else:
                    one[name] = [0.0, 0.0, 0]
            sums.append(one)
        apply_bn_statistics(model, sums)
        return state_to_arrays(model)

    def min_replies(self) -> int:
        return 0  # the server fine-tunes even when every client sat out

    def aggregate(self, server_round, updates):
        glob = dict(zip(self.keys, self.current))
        if updates:
            clients = [dict(zip(self.keys, u.arrays)) for u in updates]
            glob = self.momentum.step(glob, clients, keys=[k for k in self.keys if is_averaged_key(k)])
        new = self._fine_tune(server_round, glob)
        return [new[k] for k in self.keys]

    def train_metrics(self, updates):
        metrics: dict[str, float | int] = {"num-clients": len(updates),
                                           "sat-out": sum(1 for f in self.failures if f.kind == "sat-out")}
        if updates:
            metrics.update(super().train_metrics(updates))
        return metrics

    def _fine_tune(self, server_round: int, glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model = self.server.model
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in glob.items()})
        if self._server_opt is None:
            self._server_opt = _sgd(model.parameters(), self.options.lr, self.options.weight_decay)
        n = int(self.xs.shape[0])
        bs = self.options.server_batch_size or (10 if n <= 1000 else 250)
        gen = torch_generator(self.seed, "semifl-server", server_round)
        model.train()
        for _ in range(self.options.server_epochs):
            order = torch.randperm(n, generator=gen).to(self.xs.device)
            for s in range(0, n, bs):
                idx = order[s:s + bs]
                loss = F.cross_entropy(model(weak_augment(self.xs[idx], gen, flip=self.options.flip,
                                                             padding=crop_padding(self.xs))), self.ys[idx])
                self._server_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                self._server_opt.step()
        if _bn_layers(model):
            apply_bn_statistics(model, [bn_batch_sums(model, self.xs)])
        return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Global momentum and the server optimiser's momentum buffers (both persist across rounds)."""
        state = {f"momentum/{k}": v for k, v in self.momentum.buffer.items()}
        if self._server_opt is not None:
            params = [p for g in self._server_opt.param_groups for p in g["params"]]
            for i, p in enumerate(params):
                buf = self._server_opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    state[f"opt/{i}"] = buf.detach().cpu().numpy().copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.momentum.buffer = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items()
                                if k.startswith("momentum/")}
        bufs = {int(k.split("/", 1)[1]): v for k, v in state.items() if k.startswith("opt/")}
        if bufs:
            if self.server is None:
                raise ValueError("SemiFL.load_state_dict needs attach_server first (the server model's optimiser)")
            model = self.server.model
            self._server_opt = _sgd(model.parameters(), self.options.lr, self.options.weight_decay)
            for i, p in enumerate(model.parameters()):
                if i in bufs:
                    self._server_opt.state[p]["momentum_buffer"] = torch.as_tensor(
                        np.asarray(bufs[i]), dtype=p.dtype, device=p.device).clone()
