"""Noisy signSGD with majority vote (``signsgd``) and noisy medianSGD (``mediansgd``).

Reference
---------
Chen, Chen, Sun, Wu, Hong, "Distributed Training with Heterogeneous Data: Bridging Median- and
Mean-Based Algorithms", NeurIPS 2020 (arXiv 1906.01736). No official code; spec
``server-algorithms.md`` section 3. The pure math lives in
:mod:`fedsim.strategies.signsgd_aggregation`; this module wires it into Flower.

Algorithm (one round = one gradient step, the FedSGD regime the theory covers)
-----------------------------------------------------------------------------
* Client (task ``train.noisy_gradient``): load the received model, compute ONE gradient ``g`` of
  the mean cross-entropy on its whole local data set (``batch_size = 0``, the paper's full-batch
  setting) or on a seeded mini-batch, flattened over the model's trainable parameters (in
  ``named_parameters`` order). Perturb it, ``g~ = g + b xi`` with ``xi ~ N(0, I)`` drawn from
  ``numpy_rng(seed, "gradient-noise", round, client)``, then send

  - signSGD: ``sign(g~)`` packed 1 bit per coordinate (``ceil(d / 8)`` uint8 bytes, ArrayRecord
    ``signs``, array ``packed``; bit 1 = positive, little bit order, zero padding bits);
  - medianSGD: ``g~`` as float32 (ArrayRecord ``noisy``, array ``g``; ``4 d`` bytes).

  The reply metrics carry ``uplink-bytes`` (payload bytes), ``train_loss`` and ``grad-norm``.
* Server: validate every reply (record present, dtype, length, padding bits, finiteness), take the
  majority vote (ties give 0) or the coordinate-wise median, and step
  ``x <- x - delta_t * direction`` with ``delta_t = delta * decay^(t-1)``. Only trainable
  parameters move; integer buffers are never touched. The round's metrics include the total
  ``uplink-bytes`` of the accepted replies.

Exact zeros with ``b = 0``
--------------------------
A 1-bit message cannot carry ``sign(0) = 0``. Plain signSGD (``b = 0``) meets exact zeros, e.g.
the weights of pixels that are blank in every image. Option ``zero`` says what they become:
``"random"`` (default: a seeded +-1, unbiased) or ``"positive"`` (+1, as ``signum``-style
implementations do). With ``b > 0`` zeros have probability 0.

Restrictions: gradients of a model with BatchNorm statistics or dropout are rejected
(``ConfigError``): the server cannot update running statistics from gradients, and dropout would
draw from an unseeded global generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fedsim.clients.client_app import CLIENT_TASKS, ClientCall
from fedsim.config import Scenario
from fedsim.errors import ClientUpdateError, ConfigError
from fedsim.rng import derive_seed, numpy_rng
from fedsim.strategies.base import ClientUpdate, FedSimStrategy, register_strategy
from fedsim.strategies.signsgd_aggregation import (
    coordinate_median,
    noisy_sign,
    pack_signs,
    packed_size,
    perturb,
    server_step,
    vote_packed,
)
from fedsim.wire import from_numpy, to_numpy

__all__ = ["MedianSGD", "ParamLayout", "SignSGD", "check_gradient_model", "flat_gradient"]


# ---------------------------------------------------------------------------------------------
# shared by the gradient strategies (also used by fedsim.strategies.coded)
@dataclass(frozen=True)
class ParamLayout:
    """Where the flat gradient vector's coordinates live in the model's state dict.

    The vector covers the trainable parameters in ``named_parameters`` order; buffers (integer or
    float) are not part of it and are never changed by a gradient step.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ParamLayout":
        params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in params), tuple(s for _, s in params))

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> "ParamLayout":
        from fedsim.clients.runtime import dataset_meta
        from fedsim.models import build_model

        shape, classes = dataset_meta(scenario)
        return cls.from_model(build_model(scenario.model, shape, classes,
                                          derive_seed(scenario.run.seed, "model-init")))

    def positions(self, keys: list[str]) -> list[int]:
        """Index of every parameter in the state-dict ``keys``."""
        missing = [n for n in self.names if n not in keys]
        if missing:
            raise ConfigError("model", f"parameters {missing[:3]} are not in the global model's state dict",
                              "client and server must build the same model")
        return [keys.index(n) for n in self.names]

    def gather(self, keys: list[str], arrays: list[np.ndarray]) -> np.ndarray:
        """The flat float64 parameter vector of a state dict given as ``keys``/``arrays``."""
        return np.concatenate([np.asarray(arrays[i], dtype=np.float64).reshape(-1) for i in self.positions(keys)])

    def scatter(self, keys: list[str], arrays: list[np.ndarray], flat: np.ndarray) -> list[np.ndarray]:
        """A copy of ``arrays`` whose parameters are replaced by ``flat`` (each in its own dtype)."""
        flat = np.asarray(flat).reshape(-1)
        if flat.size != self.dim:
            raise ValueError(f"flat vector has {flat.size} coordinates, the model {self.dim}")
        out = list(arrays)
        start = 0
        for i, size, shape in zip(self.positions(keys), self.sizes, self.shapes):
            out[i] = flat[start:start + size].reshape(shape).astype(np.asarray(arrays[i]).dtype)
            start += size
        return out


def check_gradient_model(scenario: Scenario, strategy: str) -> None:
    """Gradient strategies need a model whose gradient is a deterministic function of the data."""
    m = scenario.model
    if m.norm == "batch":
        raise ConfigError("model.norm", f"'{strategy}' exchanges gradients, which cannot carry BatchNorm "
                          "running statistics", "use model.norm = \"group\" or \"none\"")
    if m.dropout > 0:
        raise ConfigError("model.dropout", f"'{strategy}' needs deterministic gradients; dropout would draw "
                          "from an unseeded generator", "set model.dropout = 0")


def flat_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, float]:
    """Gradient of the cross-entropy (``reduction`` ``"mean"`` or ``"sum"``) at the model's current
    weights, flattened over the trainable parameters in ``named_parameters`` order; and the loss."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    loss = torch.nn.functional.cross_entropy(model(x), y, reduction=reduction)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    return flat.detach(), float(loss.detach())


# ---------------------------------------------------------------------------------------------
# client task
SIGN_RECORD, SIGN_ARRAY = "signs", "packed"
MEDIAN_RECORD, MEDIAN_ARRAY = "noisy", "g"


def _attack_gradient(call: ClientCall, g: np.ndarray) -> np.ndarray:
    """``faults.byzantine_clients`` on gradients: sign_flip (-g), gaussian (g + N(0, 1)), nan."""
    f = call.scenario.faults
    if f.attack == "none" or call.partition_id not in f.byzantine_clients:
        return g
    if f.attack == "sign_flip":
        return -g
    if f.attack == "gaussian":
        return g + numpy_rng(call.scenario.run.seed, "attack", call.round, call.partition_id).standard_normal(g.shape)
    if f.attack == "nan":
        return np.full_like(g, np.nan)
    return g


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
    g = _attack_gradient(call, g_t.to(torch.float64).cpu().numpy())
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
    def _payload(self, content: RecordDict, pid: int, record: str, array: str) -> np.ndarray:
        if record not in content.array_records:
            raise ClientUpdateError(pid, record, "missing from the reply",
                                    f"the client task must return an ArrayRecord '{record}'")
        rec = content.array_records[record]
        if list(rec.keys()) != [array]:
            raise ClientUpdateError(pid, record, f"expected exactly one array '{array}', got {list(rec.keys())[:3]}")
        try:
            return to_numpy(rec[array])
        except ValueError as err:
            raise ClientUpdateError(pid, f"{record}.{array}", str(err), "the record is corrupt") from None

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
        a = self._payload(content, pid, SIGN_RECORD, SIGN_ARRAY)
        d = self.layout.dim
        field = f"{SIGN_RECORD}.{SIGN_ARRAY}"
        if a.dtype != np.uint8:
            raise ClientUpdateError(pid, field, f"dtype {a.dtype}, expected uint8 (1 bit per coordinate)",
                                    "pack the signs with pack_signs")
        if a.ndim != 1 or a.size != packed_size(d):
            raise ClientUpdateError(pid, field, f"shape {a.shape}, expected ({packed_size(d)},) = ceil({d}/8) bytes",
                                    "the client must pack exactly one bit per model coordinate")
        if d % 8 and int(a[-1]) >> (d % 8):
            raise ClientUpdateError(pid, field, f"padding bits after coordinate {d} are set",
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
        a = self._payload(content, pid, MEDIAN_RECORD, MEDIAN_ARRAY)
        d = self.layout.dim
        field = f"{MEDIAN_RECORD}.{MEDIAN_ARRAY}"
        if a.dtype != np.float32:
            raise ClientUpdateError(pid, field, f"dtype {a.dtype}, expected float32")
        if a.shape != (d,):
            raise ClientUpdateError(pid, field, f"shape {a.shape}, expected ({d},)",
                                    "client and server must build the same model")
        if not np.isfinite(a).all():
            raise ClientUpdateError(pid, field, "contains NaN or Inf", "check the client's data and model")
        return [a]

    def direction(self, updates: list[ClientUpdate]) -> np.ndarray:
        return coordinate_median([u.arrays[0] for u in updates])
