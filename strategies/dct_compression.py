"""``dct_lowrank`` as update compression: clients send DCT coefficients + column indices, the server
reconstructs (Modoranu et al., "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language
Models", 2025; math in :mod:`fedsim.strategies.dct_compression_math`).

Each sampled client trains as in FedAvg (the scenario's plugins included) and sends its update
``Δ = w_local - w_global``: every floating tensor with at least 2 dimensions as the coefficients of its
``r = round(density · n)`` best-aligned DCT columns and their indices (``n`` its smaller matrix
side), vectors (biases, norms) dense. The server rebuilds each ``Δ̂``, takes the example-weighted
mean and moves the global model by ``server_lr`` times it. With ``density = 1`` the reconstruction
is exact and the round is FedAvg (up to float rounding). Non-floating tensors (BatchNorm's
``num_batches_tracked``) are not sent and keep the server's value. There is no error feedback: what
a client's low-rank update leaves out is dropped. Byzantine faults are refused (the attack model is
written for dense models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedsim.clients.tasks import CLIENT_TASKS, ClientCall
from fedsim.clients.trainer import train_local
from fedsim.config import Scenario
from fedsim.errors import ClientUpdateError, ConfigError
from fedsim.strategies.base import ClientUpdate, FedSimStrategy, register_strategy
from fedsim.strategies.dct_compression_math import compress, rank_for, reconstruct
from fedsim.strategies.fedavg_math import weighted_mean
from fedsim.strategies.replies import expect_array
from fedsim.wire import from_numpy, to_numpy

RECORD = "dct"


@CLIENT_TASKS.register("dct_lowrank")
def dct_lowrank_task(call: ClientCall) -> RecordDict:
    """Train locally; send the update, matrices as DCT coefficients + indices, vectors dense."""
    received = {k: to_numpy(a) for k, a in call.msg.content.array_records["arrays"].items()}
    model = call.load_global()
    x, y = call.data()
    stack = call.plugins()
    res = train_local(model, x, y, call.scenario.client, stack, round=call.round, client_id=call.partition_id,
                      seed=call.scenario.run.seed, rng=call.rng("train"), config=call.config,
                      progress=call.progress(), progress_span=call.progress_span(), probe_rng=call.probe_rng(stack))
    call.save_plugins(stack)
    density = float(call.config["dct-density"])
    out: dict[str, Any] = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            continue
        delta = v.detach().cpu().numpy() - received[k]
        if delta.ndim >= 2:
            coef, idx = compress(delta, density)
            out[f"{k}.coef"], out[f"{k}.idx"] = from_numpy(coef), from_numpy(idx)
        else:
            out[f"{k}.delta"] = from_numpy(delta.astype(np.float32))
    metrics = call.reply_metrics(**{"num-examples": res.num_examples, "steps": res.steps,
                                    "sim-time": call.simulated_time(res.steps)}, **res.metrics)
    return RecordDict({RECORD: ArrayRecord(out), "metrics": metrics})


@register_strategy
class DCTLowRank(FedSimStrategy):
    """FedAvg on DCT low-rank compressed updates (see the module docstring)."""

    name = "dct_lowrank"
    train_action = "train.dct_lowrank"

    @dataclass(frozen=True)
    class Options:
        """density: share of each matrix's DCT columns sent (0, 1]; server_lr: step on the mean update."""

        density: float = 0.25
        server_lr: float = 1.0

        def __post_init__(self) -> None:
            rank_for(1, self.density)  # raises for a density outside (0, 1]
            if not (self.server_lr > 0 and math.isfinite(self.server_lr)):
                raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def __init__(self, scenario: Scenario, options: Any | None = None) -> None:
        super().__init__(scenario, options)
        if scenario.faults.byzantine_clients:
            raise ConfigError("faults.byzantine_clients", "strategy dct_lowrank does not run fedsim's Byzantine "
                              "attacks (they corrupt dense models, this strategy sends compressed updates)",
                              "use strategy.name = \"fedavg\" or a robust strategy for attacks")

    def train_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        return {"dct-density": float(self.options.density)}

    def parse_reply(self, content: RecordDict, metrics: dict[str, Any], pid: int) -> list[np.ndarray]:
        out = []
        for k, ref in zip(self.keys, self.current):
            if ref.dtype.kind != "f":
                continue
            if ref.ndim < 2:
                out.append(expect_array(content, pid, RECORD, f"{k}.delta", dtype=np.float32, shape=ref.shape))
                continue
            coef = expect_array(content, pid, RECORD, f"{k}.coef", dtype=np.float32)
            idx = expect_array(content, pid, RECORD, f"{k}.idx", dtype=np.int32)
            n = min(ref.shape[0], ref.size // ref.shape[0])
            if len(idx) != rank_for(n, self.options.density):
                raise ClientUpdateError(pid, f"{RECORD}.{k}.idx", f"{len(idx)} columns, expected "
                                        f"{rank_for(n, self.options.density)}", "send round(density · n) columns")
            try:
                out.append(reconstruct(coef, idx, ref.shape))
            except ValueError as err:
                raise ClientUpdateError(pid, f"{RECORD}.{k}", str(err)) from None
        return out

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        mean = weighted_mean([[a.astype(np.float64) for a in u.arrays] for u in updates],
                             [u.num_examples for u in updates])
        new, step = list(self.current), iter(mean)
        for i, a in enumerate(self.current):
            if a.dtype.kind == "f":
                new[i] = (a.astype(np.float64) + self.options.server_lr * next(step)).astype(a.dtype)
        return new
