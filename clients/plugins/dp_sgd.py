"""Sample-level DP-SGD on each client with Opacus (per-sample clipping + Gaussian noise).

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016; Opacus (Yousefpour et al. 2021).
Enabled by ``[privacy] mechanism = "dp-sgd"``. Each local step draws a Poisson batch (every local
sample kept with probability ``q``), computes per-sample gradients (Opacus ``GradSampleModule``),
clips each to ``clip_norm``, adds ``N(0, (z·clip_norm)²)`` and divides by the expected batch size
(Opacus ``DPOptimizer``). An epoch is ``round(1/q)`` steps.

What Flower's own Opacus example gets wrong and this plugin does not:

* the accountant is **per client and persists across rounds** (its ledger lives in
  ``context.state``), so ε covers the whole run, not one round;
* the model is wrapped only for the round and unwrapped after it: no ``_module.`` prefix ever
  reaches the global model;
* unsupported layers are rejected before the run (``preflight``), with the fix named.

Per-sample gradients come from one of Opacus's grad-sample modes (``grad_sample_mode``): its
forward/backward hooks (``"hooks"``), ``torch.func`` per layer (``"functorch"``) or PyTorch's
expanded weights (``"ew"``), or from fedsim's ``"ghost_linear"`` (:mod:`fedsim.clients.dp_linear`:
per-sample norms from each ``nn.Linear``'s input and output gradient, the clipped sum one matmul per
layer, one call of Opacus's noise function over all parameters; only for models whose trainable
layers are all ``nn.Linear``, see :func:`~fedsim.clients.dp_linear.ghost_linear_reason`, refused
otherwise). All give the hooks' clipped and noised update to float rounding for the same noise (the
Opacus modes draw the same noise for the same seed; ``ghost_linear`` draws it in one piece, so other
values of the same distribution), so the mechanism and its accounting are the same whatever the
mode. ``"auto"`` (the default) takes ``ghost_linear`` where the model qualifies (the logistic
regression and the MLP), else expanded weights when every layer with parameters is one PyTorch's
expanded weights handle (``EW_LAYERS``: the GroupNorm CNN), else the hooks: the fastest mode
measured by ``bench/bench_dpsgd.py`` for those models (Opacus's ghost clipping was measured too and
was slower on all three). The mode used is reported
per client and round as ``dp_sgd/grad_sample_mode`` (an index into ``GRAD_SAMPLE_MODES``: 0 hooks,
1 functorch, 2 ew, 3 ghost_linear). An empty Poisson batch skips Opacus's machinery (expanded
weights refuse a batch of 0; ``ghost_linear`` runs it as any batch) and gives, as the hooks do, zero
per-sample gradients: that step's update is the noise alone.

Neutral setting: ``poisson = false``, no noise and no clipping → Opacus is not engaged at all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.clients.dp_linear import GhostLinear, ghost_linear_reason, optimizer_params
from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.errors import IncompatibleModelError

#: the grad-sample modes, in the order of the reported ``dp_sgd/grad_sample_mode`` index (append only)
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost_linear")
#: layers PyTorch's expanded weights compute per-sample gradients for (torch.nn.utils._expanded_weights)
EW_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d,
             nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Embedding)


def choose_grad_sample_mode(model: nn.Module, sample_shape: Sequence[int],
                            params: Sequence[nn.Parameter] | None = None) -> str:
    """``"ghost_linear"`` when :func:`~fedsim.clients.dp_linear.ghost_linear_reason` finds nothing against
    it (samples of ``sample_shape``; ``params``: the optimizer's); else ``"ew"`` when every module holding
    trainable parameters is one of ``EW_LAYERS`` (exactly that type) and no parameter is shared between
    modules; ``"hooks"`` otherwise."""
    if ghost_linear_reason(model, sample_shape, params) is None:
        return "ghost_linear"
    owners = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    ids = [id(p) for m in owners for p in m.parameters(recurse=False)]
    if owners and all(type(m) in EW_LAYERS for m in owners) and len(ids) == len(set(ids)):
        return "ew"
    return "hooks"


def preflight(model: torch.nn.Module, grad_sample_mode: str = "auto", sample_shape: Sequence[int] | None = None,
              params: Sequence[nn.Parameter] | None = None) -> None:
    """Reject modules Opacus cannot privatise (e.g. BatchNorm), and ``grad_sample_mode = "ghost_linear"``
    for a model it does not apply to (samples of ``sample_shape``), naming the fix."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        names = sorted({type(e).__name__ + ": " + str(e).split("\n")[0][:120] for e in errors})
        hint = "use model.norm = \"group\" (GroupNorm) instead of BatchNorm" if any(
            "BatchNorm" in n for n in names) else "replace the listed layers"
        raise IncompatibleModelError(f"model.name: DP-SGD cannot privatise this model: {'; '.join(names)}", hint)
    if grad_sample_mode == "ghost_linear":
        if sample_shape is None:
            raise ValueError("checking grad_sample_mode 'ghost_linear' needs the shape of one sample")
        _check_ghost_linear(model, sample_shape, params)


def _check_ghost_linear(model: nn.Module, sample_shape: Sequence[int], params) -> None:
    if (why := ghost_linear_reason(model, sample_shape, params)) is not None:
        raise IncompatibleModelError(
            f"dp_sgd.grad_sample_mode: 'ghost_linear' computes exact per-sample norms only for models whose "
            f"trainable layers are all nn.Linear on (batch, features) inputs, and here {why}",
            "use grad_sample_mode = 'auto' (it picks 'ghost_linear' where it applies), 'ew' or 'hooks'")


@register_plugin
class DPSGD(ClientPlugin):
    name = "dp_sgd"
    events = frozenset({Event.ROUND_START, Event.SAMPLER, Event.BEFORE_FORWARD, Event.AFTER_BACKWARD,
                        Event.AFTER_STEP, Event.ROUND_END})
    owns = frozenset({"sampler", "step"})

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        noise_multiplier: float = 1.0
        clip_norm: float = 1.0
        sample_rate: float = 0.0  # 0: batch_size / local dataset size
        poisson: bool = True
        accountant: str = "rdp"
        delta: float = 1e-5
        secure_rng: bool = False
        grad_sample_mode: str = "auto"  # "auto" | "hooks" | "functorch" | "ew" | "ghost_linear"

        def __post_init__(self) -> None:
            if self.noise_multiplier < 0 or self.clip_norm <= 0 or not 0 <= self.sample_rate <= 1:
                raise ValueError("need noise_multiplier >= 0, clip_norm > 0, 0 <= sample_rate <= 1")
            if self.grad_sample_mode not in ("auto", *GRAD_SAMPLE_MODES):
                raise ValueError(f"grad_sample_mode must be 'auto' or one of {GRAD_SAMPLE_MODES}, "
                                 f"got {self.grad_sample_mode!r}")

        @classmethod
        def neutral(cls) -> "DPSGD.Settings":
            return cls(noise_multiplier=0.0, clip_norm=math.inf, poisson=False)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        from fedsim.privacy.accountants import make_accountant

        self.accountant = make_accountant(self.settings.accountant)
        self._engaged = False

    @property
    def neutral_mode(self) -> bool:
        s = self.settings
        return not s.poisson and s.noise_multiplier == 0 and math.isinf(s.clip_norm)

    def preflight(self, scenario) -> None:
        """Refuse ``grad_sample_mode = "ghost_linear"`` for a scenario whose model it would not clip exactly."""
        if self.settings.grad_sample_mode == "ghost_linear" and not self.neutral_mode:
            from fedsim.data.federation import federation_of
            from fedsim.models import build_model

            fed = federation_of(scenario)
            shape = tuple(fed.input_shape)
            preflight(build_model(scenario.model, shape, int(fed.num_classes), 0), "ghost_linear", shape)

    def on(self, event: Event, state: TrainState) -> None:
        if self.neutral_mode:
            if event is Event.STEP:
                state.optimizer.step()
            return
        getattr(self, f"_{event.value}")(state)

    # -------------------------------------------------------------------------------------------
    def _round_start(self, state: TrainState) -> None:
        from opacus.optimizers import DPOptimizer

        s = self.settings
        n = int(state.x.shape[0])
        self.q = s.sample_rate or min(1.0, state.batch_size / max(n, 1))
        self.steps_per_epoch = max(1, round(1 / self.q))
        self.original, self.optimizer = state.model, state.optimizer
        params, shape = optimizer_params(state.optimizer), tuple(state.x.shape[1:])
        if s.grad_sample_mode == "ghost_linear":  # refused before the first step where it would not be exact
            _check_ghost_linear(state.model, shape, params)
        self.mode = choose_grad_sample_mode(state.model, shape, params) if s.grad_sample_mode == "auto" \
            else s.grad_sample_mode
        self.noise_gen = None
        if not s.secure_rng:
            self.noise_gen = torch.Generator(device=state.device)
            self.noise_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=state.rng)))
        self.expected_batch_size = max(1, round(self.q * n))
        if self.mode == "ghost_linear":  # no Opacus wrapper: the plugin's step clips and noises (dp_linear)
            self.gsm = GhostLinear(state.model, params)
            state.model = self.gsm
        else:
            self.gsm = _grad_sample_module(state.model, self.mode)
            self.opt = DPOptimizer(state.optimizer, noise_multiplier=s.noise_multiplier, max_grad_norm=s.clip_norm,
                                   expected_batch_size=self.expected_batch_size, loss_reduction="mean",
                                   generator=self.noise_gen, secure_mode=s.secure_rng)
            state.model, state.optimizer = self.gsm, self.opt
        state.loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="sum")
        self.steps = 0
        self.loss_total = 0.0
        self.samples = 0
        self._engaged = True

    def _sampler(self, state: TrainState) -> None:
        n = int(state.x.shape[0])
        if not self.settings.poisson:
            bs = state.batch_size
            state.batches = [state.order[i:i + bs] for i in range(0, n, bs)]
            return
        batches = []
        for _ in range(self.steps_per_epoch):
            keep = torch.rand(n, generator=state.rng) < self.q
            batches.append(torch.nonzero(keep).flatten().to(state.device))
        state.batches = batches

    def _before_forward(self, state: TrainState) -> None:
        if self.mode == "ew":  # expanded weights refuse to run over the last step's per-sample gradients
            for p in self.original.parameters():
                p.grad_sample = None
        if self.mode in ("functorch", "ew") and state.batch[0].shape[0] == 0:
            state.model = self.original  # an empty batch bypasses the mode (see the module docstring)
            if hasattr(self.gsm, "disable_hooks"):  # functorch runs inside Opacus's hooks
                self.gsm.disable_hooks()

    def _after_backward(self, state: TrainState) -> None:
        if state.model is self.original:
            for p in self.original.parameters():
                if p.requires_grad:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            if hasattr(self.gsm, "enable_hooks"):
                self.gsm.enable_hooks()
            state.model = self.gsm

    def _step(self, state: TrainState) -> None:
        if self.mode == "ghost_linear":
            s = self.settings
            self.gsm.private_grads(s.clip_norm, s.noise_multiplier * s.clip_norm, self.expected_batch_size,
                                   self.noise_gen, s.secure_rng)
        state.optimizer.step()

    def _after_step(self, state: TrainState) -> None:
        self.steps += 1
        self.loss_total += float(state.loss_terms["ce"].detach())
        self.samples += int(state.batch[1].shape[0])

    def _round_end(self, state: TrainState) -> None:
        from fedsim.privacy.events import PoissonGaussianEvent

        if self.mode != "ghost_linear":
            self.gsm._close()
        state.model, state.optimizer = self.original, self.optimizer
        self._engaged = False
        if self.steps:
            self.accountant.compose(PoissonGaussianEvent(self.settings.noise_multiplier, self.q), self.steps)
        eps = self.accountant.epsilon(self.settings.delta)
        state.metrics["dp_sgd/epsilon"] = float(eps) if math.isfinite(eps) else 1e300
        # what this client did, for the server to verify against what it accounts
        state.metrics["dp_sgd/steps"] = float(self.steps)
        state.metrics["dp_sgd/sample_rate"] = float(self.q)
        state.metrics["dp_sgd/noise_multiplier"] = float(self.settings.noise_multiplier)
        state.metrics["dp_sgd/clip_norm"] = float(self.settings.clip_norm)
        state.metrics["dp_sgd/poisson"] = int(self.settings.poisson)
        state.metrics["dp_sgd/grad_sample_mode"] = GRAD_SAMPLE_MODES.index(self.mode)
        state.metrics["train_loss"] = self.loss_total / max(self.samples, 1)

    def state_dict(self) -> dict:
        return {"accountant": json.dumps(self.accountant.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        if "accountant" in state:
            self.accountant.load_state_dict(json.loads(str(state["accountant"])))


def _grad_sample_module(model: nn.Module, mode: str):
    """Opacus's grad-sample wrapper of ``model`` for ``mode`` (per-sample gradients of a summed loss)."""
    from opacus import GradSampleModule

    if mode == "ew":
        from opacus.grad_sample import GradSampleModuleExpandedWeights

        return GradSampleModuleExpandedWeights(model, loss_reduction="sum")
    return GradSampleModule(model, loss_reduction="sum", force_functorch=mode == "functorch")
