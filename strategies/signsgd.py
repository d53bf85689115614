"""Noisy signSGD with majority vote (``signsgd``) and noisy medianSGD (``mediansgd``).

Chen, Chen, Sun, Wu, Hong, "Distributed Training with Heterogeneous Data: Bridging Median- and
Mean-Based Algorithms", NeurIPS 2020 (arXiv 1906.01736); spec ``server-algorithms.md`` section 3.

One round is one gradient step. Each client (task ``train.noisy_gradient``) sends one gradient of
its local data at the received model, perturbed as ``g + b xi``: its signs packed 1 bit per
coordinate (signSGD) or the float32 vector (medianSGD). The server takes the majority vote or
the coordinate-wise median (:mod:`fedsim.strategies.signsgd_math`) and steps
``x <- x - delta_t * direction``. Wire format, exact zeros and restrictions:
``strategies/README.md``, section "signsgd / mediansgd".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fedsim.clients.tasks import CLIENT_TASKS, ClientCall
from fedsim.config import Scenario
from fedsim.errors import ClientUpdateError, ConfigError
from fedsim.rng import numpy_rng
from fedsim.strategies.base import ClientUpdate, FedSimStrategy, register_strategy
from fedsim.strategies.gradients import ParamLayout, check_gradient_model, flat_gradient
from fedsim.strategies.replies import expect_array
from fedsim.strategies.signsgd_math import (
    coordinate_median,
    noisy_sign,
    pack_signs,
    packed_size,
    perturb,
    server_step,
    vote_packed,
)
from fedsim.wire import from_numpy

__all__ = ["MedianSGD", "SignSGD", "noisy_gradient_task"]


# ---------------------------------------------------------------------------------------------
# client task
SIGN_RECORD, SIGN_ARRAY = "signs", "packed"
MEDIAN_RECORD, MEDIAN_ARRAY = "noisy", "g"


@CLIENT_TASKS.register("noisy_gradient")
def noisy_gradient_task(call: ClientCall) -> RecordDict:
    """One local gradient at the received model, perturbed and signed/packed or sent as float32."""
    cfg = call.config
    mode, b, batch_size = str(cfg["mode"]), float(cfg["b"]), int(cfg["batch-size"])
    model = call.load_global()
    model.train()
    x, y = call.data()
    n = int(x.shape[0])
    if 0 < batch_size < n:
        idx = torch.randperm(n, generator=call.rng("gradient-batch"))[:batch_size].to(x.device)
        x, y = x[idx], y[idx]
    g_t, loss = flat_gradient(model, x, y)
    g = call.attack_gradient(g_t.to(torch.float64).cpu().numpy())
    rng = numpy_rng(call.scenario.run.seed, "gradient-noise", call.round, call.partition_id)
    if mode == "sign":
        if np.isnan(g).any():  # a corrupted client: send something the server must reject
            payload = g.astype(np.float32)
        else:
            payload = pack_signs(noisy_sign(g, b, rng, zero=str(cfg.get("zero", "random"))))
        record = ArrayRecord({SIGN_ARRAY: from_numpy(payload)})
        key = SIGN_RECORD
    elif mode == "median":
        payload = perturb(g, b, rng).astype(np.float32)
        record = ArrayRecord({MEDIAN_ARRAY: from_numpy(payload)})
        key = MEDIAN_RECORD
    else:
        raise ConfigError("config.mode", f"unknown gradient message mode {mode!r}", "use 'sign' or 'median'")
    metrics = call.reply_metrics(**{"num-examples": int(x.shape[0]), "uplink-bytes": int(payload.nbytes),
                                    "train_loss": loss, "grad-norm": float(np.linalg.norm(g)),
                                    "sim-time": call.simulated_time(1)})
    return RecordDict({key: record, "metrics": metrics})


# ---------------------------------------------------------------------------------------------
# strategies
@dataclass(frozen=True)
class NoisyGradientOptions:
    """Options shared by ``signsgd`` and ``mediansgd``.

    b           noise scale (``g + b xi``, ``xi ~ N(0, I)``); 0 = plain signSGD / medianSGD
    delta       server step size
    decay       step decay per round: ``delta_t = delta * decay^(t - 1)`` (1 = constant)
    batch_size  0 = full local batch (the paper's setting), else a seeded mini-batch of this size
    """

    b: float = 0.0
    delta: float = 1e-3
    decay: float = 1.0
    batch_size: int = 0

    def __post_init__(self) -> None:
        if not (self.b >= 0 and math.isfinite(self.b)):
            raise ValueError(f"b must be a finite number >= 0, got {self.b}")
        if not (self.delta > 0 and math.isfinite(self.delta)):
            raise ValueError(f"delta must be > 0, got {self.delta}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must lie in (0, 1], got {self.decay}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 (0 = full batch), got {self.batch_size}")


@dataclass(frozen=True)
class SignOptions(NoisyGradientOptions):
    """``zero``: what an exact zero of ``g + b xi`` becomes on the 1-bit wire: random | positive."""

    zero: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero not in ("random", "positive"):
            raise ValueError(f"zero must be 'random' or 'positive', got {self.zero!r}")


class _NoisyGradient(FedSimStrategy):
    """Common server side: gradient messages in, one step of ``delta_t`` along a robust direction."""

    mode: ClassVar[str] = ""
    train_action = "train.noisy_gradient"
    Options = NoisyGradientOptions

    def __init__(self, scenario: Scenario, options: Any | None = None) -> None:
        super().__init__(scenario, options)
        check_gradient_model(scenario, self.name)
        self.layout = ParamLayout.from_scenario(scenario)
        self.round_info: dict[str, float] = {}

    def step_size(self, server_round: int) -> float:
        return self.options.delta * self.options.decay ** (server_round - 1)

    def train_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {"mode": self.mode, "b": float(self.options.b),
                               "batch-size": int(self.options.batch_size)}
        if hasattr(self.options, "zero"):
            cfg["zero"] = self.options.zero
        return cfg

    # -- validation ------------------------------------------------------------------------------
    def _payload(self, content: RecordDict, pid: int, record: str, array: str, **checks: Any) -> np.ndarray:
        """The one array ``record.array`` of a reply, checked by :func:`expect_array` (``checks``)."""
        rec = content.array_records.get(record)
        if rec is not None and list(rec.keys()) != [array]:
            raise ClientUpdateError(pid, record, f"expected exactly one array '{array}', got {list(rec.keys())[:3]}")
        return expect_array(content, pid, record, array, **checks)

    def direction(self, updates: list[ClientUpdate]) -> np.ndarray:
        raise NotImplementedError

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        direction = self.direction(updates)
        delta = self.step_size(server_round)
        x = self.layout.gather(self.keys, self.current)
        self.round_info["step-size"] = delta
        self.round_info["direction-norm"] = float(np.linalg.norm(direction))
        return self.layout.scatter(self.keys, self.current, server_step(x, direction, delta))

    def train_metrics(self, updates: list[ClientUpdate]) -> dict[str, float | int]:
        out = super().train_metrics(updates)
        sizes = [int(u.arrays[0].nbytes) for u in updates]   # measured here, not the client's claim
        out["uplink-bytes"] = int(sum(sizes))
        out["uplink-bytes-per-client"] = float(np.mean(sizes)) if sizes else 0.0
        out.update(self.round_info)
        self.round_info = {}
        return out


@register_strategy
class SignSGD(_NoisyGradient):
    """Noisy signSGD with majority vote: 1-bit signs of ``g + b xi`` up, ``sign(sum_i s_i)`` applied."""

    name = "signsgd"
    mode = "sign"
    Options = SignOptions

    def parse_reply(self, content: RecordDict, metrics: dict[str, Any], pid: int) -> list[np.ndarray]:
        d = self.layout.dim
        a = self._payload(content, pid, SIGN_RECORD, SIGN_ARRAY, dtype=np.uint8, shape=(packed_size(d),),
                          hint="the client must pack exactly one bit per model coordinate (pack_signs)")
        if d % 8 and int(a[-1]) >> (d % 8):
            raise ClientUpdateError(pid, f"{SIGN_RECORD}.{SIGN_ARRAY}", f"padding bits after coordinate {d} are set",
                                    "the packed message does not match this model")
        return [a]

    def direction(self, updates: list[ClientUpdate]) -> np.ndarray:
        vote = vote_packed([u.arrays[0] for u in updates], self.layout.dim)
        self.round_info["vote-zero-fraction"] = float(np.mean(vote == 0))
        return vote


@register_strategy
class MedianSGD(_NoisyGradient):
    """Noisy medianSGD: ``g + b xi`` (float32) up, the coordinate-wise median applied."""

    name = "mediansgd"
    mode = "median"
    Options = NoisyGradientOptions

    def parse_reply(self, content: RecordDict, metrics: dict[str, Any], pid: int) -> list[np.ndarray]:
        return [self._payload(content, pid, MEDIAN_RECORD, MEDIAN_ARRAY, dtype=np.float32, shape=(self.layout.dim,))]

    def direction(self, updates: list[ClientUpdate]) -> np.ndarray:
        return coordinate_median([u.arrays[0] for u in updates])
