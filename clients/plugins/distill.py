"""Knowledge distillation from a frozen teacher: logit KD and feature distillation, in two stages.

References
----------
Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS DL Workshop 2014
(arXiv 1503.02531): ``L = (1 - alpha) CE(y, s) + alpha tau^2 KL(softmax(t / tau) || softmax(s / tau))``;
the ``tau^2`` factor keeps the soft term's gradients at the scale of the hard term's when ``tau`` changes.
Huang et al., "Generic-to-Specific Distillation of Masked Autoencoders" (G2SD), CVPR 2023: a *generic*
stage in which the student regresses the teacher's normalised hidden features, then a *specific*
stage matching the teacher's predictions. Spec: ``client-plugins.md`` §B.18.

Here the two stages are switched on the run's global progress: while ``progress < generic_until``
the loss gets ``feature_weight * MSE(LN(f_s), LN(f_t))`` on the penultimate features (``LN``: layer
normalisation without affine, as G2SD normalises targets); afterwards the logit term. MAE masking and
G2SD's light decoder are not part of this plugin (our models are classifiers; the teacher has the
student's architecture, so features match without a decoder).

Teacher: ``teacher = "global"`` is the model the client received this round (the previous global
model), evaluated at a snapshot of its parameters and buffers with ``functional_call`` (no second
model copy); a path to a run's ``checkpoints/round_N.npz`` loads that model instead (same architecture).
The teacher runs in eval mode without gradients. ``alpha = 0`` and ``feature_weight = 0`` is neutral.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.clients.plugins.penultimate import classifier_of, features_and_logits
from fedsim.errors import ConfigError

__all__ = ["Distill", "feature_loss", "kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``, mean over the batch (Hinton et al. 2014)."""
    log_s = F.log_softmax(student_logits / tau, dim=1)
    log_t = F.log_softmax(teacher_logits.detach() / tau, dim=1)
    return tau * tau * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


def feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean squared error between layer-normalised feature vectors (G2SD's normalised regression)."""
    d = student_features.shape[-1:]
    return F.mse_loss(F.layer_norm(student_features, d), F.layer_norm(teacher_features.detach(), d))


def load_teacher(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model arrays of a checkpoint as named tensors matching ``model``'s state dict."""
    from fedsim.results import load_checkpoint

    ckpt = load_checkpoint(path)
    arrays = dict(zip(ckpt["meta"]["keys"], ckpt["model"]))
    own = model.state_dict()
    if set(arrays) != set(own) or any(tuple(arrays[k].shape) != tuple(v.shape) for k, v in own.items()):
        raise ConfigError("client.distill.teacher", f"checkpoint {path} holds another architecture than this "
                          "run's model", "use a checkpoint of a run with the same [model] section")
    return {k: torch.as_tensor(arrays[k], device=v.device).to(v.dtype) for k, v in own.items()}


@register_plugin
class Distill(ClientPlugin):
    """Adds ``alpha * (kd - ce)`` (specific stage) or ``feature_weight * feature MSE`` (generic stage)."""

    name = "distill"
    events = frozenset({Event.ROUND_START, Event.BEFORE_FORWARD, Event.AFTER_FORWARD, Event.LOSS,
                        Event.ROUND_END})
    needs = frozenset({"global_params"})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["distill"]', "client.distill.alpha=0.5", "client.distill.tau=4.0")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        alpha: float = 0.5           # weight of the soft term: (1 - alpha) CE + alpha tau^2 KL
        tau: float = 4.0             # softmax temperature
        teacher: str = "global"      # "global" (the received model) or a checkpoints/round_N.npz path
        feature_weight: float = 0.0  # generic stage: weight of the normalised feature MSE
        generic_until: float = 0.0   # global progress (0..1) at which the generic stage hands over

        def __post_init__(self) -> None:
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
            if self.tau <= 0:
                raise ValueError(f"tau must be > 0, got {self.tau}")
            if self.feature_weight < 0 or not 0.0 <= self.generic_until <= 1.0:
                raise ValueError("feature_weight must be >= 0 and generic_until in [0, 1]")
            if (self.feature_weight > 0) != (self.generic_until > 0):
                raise ValueError("the generic stage needs both feature_weight > 0 and generic_until > 0 "
                                 "(one without the other would have no effect)")
            if self.teacher != "global":
                if not self.teacher.endswith(".npz") or not Path(self.teacher).is_file():
                    raise ValueError(f"teacher must be 'global' or an existing checkpoint .npz file, "
                                     f"got '{self.teacher}'")

        @classmethod
        def neutral(cls) -> "Distill.Settings":
            return cls(alpha=0.0, feature_weight=0.0, generic_until=0.0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._teacher: dict[str, torch.Tensor] = {}
        self._features: list[torch.Tensor] = []
        self._hook = None
        self._sums = {"kd": 0.0, "feature": 0.0}
        self._steps = {"kd": 0, "feature": 0}

    def _generic(self, state: TrainState) -> bool:
        return state.progress < self.settings.generic_until

    def _active(self, state: TrainState) -> bool:
        s = self.settings
        return (s.feature_weight > 0) if self._generic(state) else (s.alpha > 0)

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if event is Event.ROUND_START:
            if s.teacher == "global":  # the received parameters (loop snapshot) and buffers
                buffers = {k: v.detach().clone() for k, v in state.model.named_buffers()}
                self._teacher = {**buffers, **state.global_params}
            elif not self._teacher:
                self._teacher = load_teacher(s.teacher, state.model)
            return
        if event is Event.ROUND_END:
            self._remove_hook()
            for k in ("kd", "feature"):
                if self._steps[k]:
                    state.metrics[f"distill/{k}"] = self._sums[k] / self._steps[k]
            return
        if not self._active(state):
            return
        if event is Event.BEFORE_FORWARD and self._generic(state):
            _, head = classifier_of(state.model)
            self._features = []
            self._hook = head.register_forward_hook(lambda _m, inp, _o: self._features.append(inp[0]))
        elif event is Event.AFTER_FORWARD:
            self._remove_hook()
        elif event is Event.LOSS:
            bx = state.batch[0]
            was = state.model.training
            state.model.eval()
            with torch.no_grad():
                t_feat, t_logits = features_and_logits(state.model, bx, self._teacher)
            state.model.train(was)
            if self._generic(state):
                term = feature_loss(self._features[-1].flatten(1), t_feat)
                state.add_loss("distill", s.feature_weight * term)
                key = "feature"
            else:
                term = kd_loss(state.outputs, t_logits, s.tau)
                state.add_loss("distill", s.alpha * (term - state.loss_terms["ce"]))
                key = "kd"
            self._sums[key] += float(term.detach())
            self._steps[key] += 1

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
