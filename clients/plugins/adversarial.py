"""PGD / FGSM adversarial training (ℓ∞) as a client plugin, with robust accuracy under attack.

References
----------
Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018 (PGD with a random start); Wong, Rice, Kolter, "Fast is better than free",
ICLR 2020 (FGSM with a random start, step 1.25 ε); Xing, Song, Cheng, "Phase Transition from Clean
Training to Adversarial Training", NeurIPS 2022 (the ε sweep). Spec: ``client-plugins.md`` §B.12.

The attack: from ``x⁰ = x + U(−ε, ε)`` (random start) or ``x⁰ = x``,
``x^{k+1} = Π_{B_ε(x) ∩ [lo, hi]}(x^k + α · sign(∇_x ℓ(θ; x^k, y)))`` for ``K`` steps; FGSM is ``K = 1``.
``[lo, hi]`` is the valid input range: by default the range of the data the party holds (a client's
training data, the server's test split: ``[0, 1]`` for ``digits``), or the fixed ``input_range``.
The attack runs with the model in ``eval`` mode (no BatchNorm statistics are updated by it) and draws
its random start from ``torch_generator(seed, "adversarial", round, client)``, never from the training RNG.

Training loss: ``(1 − w) · ℓ(θ; x̂) + w · ℓ(θ; x)`` with ``w = clean_weight``. The batch is replaced by
``x̂`` (so the loop's ``"ce"`` term and ``train_loss`` are the adversarial loss); ``w > 0`` adds the
term ``"adversarial_clean" = w · (ℓ(θ; x) − ℓ(θ; x̂))``. ``epsilon = 0`` is neutral: nothing changes.

Metrics: ``adversarial/robust_accuracy`` (clients: accuracy on the adversarial training batches,
before each step) and, through the server's evaluation hook :meth:`Adversarial.evaluate_global`,
``adversarial/test_robust_accuracy``: accuracy on the central test split under a PGD attack of
``eval_steps`` steps at the training ε or at ``eval_epsilon`` (``test_accuracy`` stays the clean accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.rng import torch_generator

__all__ = ["Adversarial", "EvalMode", "attack", "data_range", "input_gradient", "project"]

LossFn = nn.functional.cross_entropy


def data_range(x: torch.Tensor, fixed: tuple[float, ...] = ()) -> tuple[float, float]:
    """The valid input range: ``fixed`` (``(lo, hi)``) when given, else the min and max of ``x``."""
    if fixed:
        return float(fixed[0]), float(fixed[1])
    return float(x.min()), float(x.max())


def project(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float, lo: float, hi: float) -> torch.Tensor:
    """Π onto ``B_ε(x) ∩ [lo, hi]`` (ℓ∞ ball, then the box; the two commute for ``x`` in the box)."""
    return torch.minimum(torch.maximum(x_adv, x - epsilon), x + epsilon).clamp(lo, hi)


def input_gradient(forward, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∇_x ℓ(forward(x), y), logits)`` for the mean cross-entropy; no parameter ``.grad`` is touched."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(x)
        (g,) = torch.autograd.grad(LossFn(logits, y), x)
    return g, logits.detach()


def attack(forward, x: torch.Tensor, y: torch.Tensor, epsilon: float, steps: int, step_size: float,
           lo: float, hi: float, random_start: bool = True, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """ℓ∞ PGD (``steps ≥ 1``; FGSM for ``steps = 1``) on ``forward`` (a callable ``x -> logits``).

    Parameters
    ----------
    forward : the model as a function of its input (e.g. ``model`` or a stale-parameter call)
    x, y : clean batch and labels (``x`` is expected inside ``[lo, hi]``)
    epsilon : radius of the ℓ∞ ball; ``0`` returns ``x`` unchanged
    steps, step_size : number of signed-gradient steps and their size ``α``
    lo, hi : valid input range
    random_start : start from ``x + U(−ε, ε)`` (projected) instead of ``x``
    generator : randomness of the random start

    Returns
    -------
    The detached adversarial batch ``x̂`` with ``‖x̂ − x‖∞ ≤ ε`` and ``lo ≤ x̂ ≤ hi``.
    """
    if epsilon == 0 or steps == 0:
        return x.detach().clone()
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        x_adv = project(x + (2 * noise - 1) * epsilon, x, epsilon, lo, hi)
    for _ in range(steps):
        g, _ = input_gradient(forward, x_adv, y)
        x_adv = project(x_adv + step_size * g.sign(), x, epsilon, lo, hi)
    return x_adv.detach()


class EvalMode:
    """Run the attack with the model in eval mode, restoring its mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was)


@register_plugin
class Adversarial(ClientPlugin):
    """Adversarial training on PGD / FGSM examples; ``epsilon = 0`` is the neutral setting."""

    name = "adversarial"
    events = frozenset({Event.ROUND_START, Event.BATCH, Event.AFTER_FORWARD, Event.LOSS, Event.ROUND_END})
    bench_scenario = "adversarial_digits"
    # the scenario enables the plugin at epsilon = 0 (plain training, robustness measured at eval_epsilon = 0.1):
    # the plain run of the benchmark drops this item and so measures the plain model under the same attack
    bench_overrides = ("client.adversarial.epsilon=0.1",)
    bench_metric = "adversarial/test_robust_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        epsilon: float = 0.1  # ℓ∞ radius on the data's scale (digits: pixels in [0, 1])
        attack: str = "pgd"  # pgd | fgsm
        steps: int = 10  # PGD steps (fgsm: 1)
        step_size: float = 0.0  # α; 0 = 2.5 ε / steps (PGD), 1.25 ε (FGSM with random start), ε (FGSM without)
        random_start: bool = True
        clean_weight: float = 0.0  # w in (1 − w)·ℓ(x̂) + w·ℓ(x)
        input_range: tuple[float, ...] = ()  # [lo, hi]; empty = min/max of the party's data
        eval_steps: int = 10  # PGD steps of the server's robust evaluation (0 = no robust evaluation)
        eval_epsilon: float = 0.0  # ℓ∞ radius of the server's robust evaluation (0 = epsilon)

        def __post_init__(self) -> None:
            object.__setattr__(self, "input_range", tuple(float(v) for v in self.input_range))
            if self.epsilon < 0 or self.eval_epsilon < 0:
                raise ValueError(f"epsilon and eval_epsilon must be >= 0, got {self.epsilon}, {self.eval_epsilon}")
            if self.attack not in ("pgd", "fgsm"):
                raise ValueError(f"attack must be 'pgd' or 'fgsm', got {self.attack!r}")
            if self.steps < 1 or self.eval_steps < 0:
                raise ValueError(f"steps must be >= 1 and eval_steps >= 0, got {self.steps}, {self.eval_steps}")
            if self.step_size < 0:
                raise ValueError(f"step_size must be >= 0 (0 = automatic), got {self.step_size}")
            if not 0 <= self.clean_weight <= 1:
                raise ValueError(f"clean_weight must be in [0, 1], got {self.clean_weight}")
            r = self.input_range
            if r and (len(r) != 2 or not r[0] < r[1]):
                raise ValueError(f"input_range must be empty or [lo, hi] with lo < hi, got {list(r)}")

        @classmethod
        def neutral(cls) -> "Adversarial.Settings":
            return cls(epsilon=0.0)

        def num_steps(self) -> int:
            return 1 if self.attack == "fgsm" else self.steps

        def alpha(self) -> float:
            if self.step_size:
                return self.step_size
            if self.attack == "fgsm":
                return 1.25 * self.epsilon if self.random_start else self.epsilon
            return 2.5 * self.epsilon / self.steps

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._range = (0.0, 1.0)
        self._gen: torch.Generator | None = None
        self._clean: tuple[torch.Tensor, torch.Tensor] | None = None
        self._correct = 0
        self._seen = 0

    def on(self, event: Event, state: TrainState) -> None:
        s = self.settings
        if s.epsilon == 0:
            return
        if event is Event.ROUND_START:
            self._range = data_range(state.x, s.input_range)
            self._gen = torch_generator(state.seed, self.name, state.round, state.client_id)
            self._correct = self._seen = 0
        elif event is Event.BATCH:
            x, y = state.batch
            with EvalMode(state.model) as model:
                x_adv = attack(model, x, y, s.epsilon, s.num_steps(), s.alpha(), *self._range,
                               random_start=s.random_start, generator=self._gen)
            self._clean = (x, y) if s.clean_weight else None
            state.batch = (x_adv, y)
        elif event is Event.AFTER_FORWARD:
            with torch.no_grad():
                self._correct += int((state.outputs.argmax(1) == state.batch[1]).sum())
                self._seen += int(state.batch[1].shape[0])
        elif event is Event.LOSS and self._clean is not None:
            x, y = self._clean
            clean = state.loss_fn(state.model(x), y)
            state.add_loss("adversarial_clean", s.clean_weight * (clean - state.loss_terms["ce"]))
        elif event is Event.ROUND_END:
            state.metrics[f"{self.name}/robust_accuracy"] = self._correct / max(self._seen, 1)
            self._clean = None

    @classmethod
    def evaluate_global(cls, settings: "Adversarial.Settings", model: nn.Module, x: torch.Tensor,
                        y: torch.Tensor, seed: int, batch_size: int = 1024) -> dict[str, float]:
        """Robust test accuracy under PGD (``eval_steps`` steps of 2.5 ε / steps, random start) at
        ``ε = eval_epsilon`` (or the training ``epsilon`` when ``eval_epsilon = 0``).

        The server's evaluation hook (``fedsim/server.py``): called on the central test split after
        the clean evaluation; ``{}`` when ``eval_steps = 0``. At ``epsilon = 0`` the attack leaves the
        inputs unchanged and the robust accuracy is the clean one (the start of an ε sweep).
        """
        if settings.eval_steps == 0:
            return {}
        eps = settings.eval_epsilon or settings.epsilon
        lo, hi = data_range(x, settings.input_range)
        gen = torch_generator(seed, cls.name, "server-evaluation")
        correct = 0
        with EvalMode(model) as m:
            for start in range(0, int(x.shape[0]), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                x_adv = attack(m, xb, yb, eps, settings.eval_steps, 2.5 * eps / settings.eval_steps, lo, hi,
                               True, gen)
                with torch.no_grad():
                    correct += int((m(x_adv).argmax(1) == yb).sum())
        return {f"{cls.name}/test_robust_accuracy": correct / max(int(x.shape[0]), 1)}
