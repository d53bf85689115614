"""SemiFL server-side math: parameter averaging, global momentum, pseudo-labels, static-BN statistics.

Reference
---------
Diao, Ding, Tarokh, "SemiFL: Semi-Supervised Federated Learning for Unlabeled Clients with
Alternate Training", NeurIPS 2022 (arXiv 2106.01432); official code
diaoenmao/SemiFL-Semi-Supervised-Federated-Learning-for-Unlabeled-Clients-with-Alternate-Training
(``src/modules/modules.py``: ``Server.update``, ``Client.make_hard_pseudo_label``; ``src/utils.py``:
the ``global`` optimiser is SGD with lr 1, momentum ``gm`` = 0.5, no Nesterov, no weight decay).
Spec: ``server-algorithms.md`` section 2.

Server update (``Server.update``): over the model's parameters whose name ends in ``weight`` or
``bias`` (BatchNorm running statistics are buffers and are never averaged), the pseudo-gradient is
``d = w - mean_i w_i`` (UNWEIGHTED over the active clients), then one SGD step with momentum:
``v = momentum * v + d`` (``v = d`` the first time, as in ``torch.optim.SGD``), ``w = w - lr * v``.
The momentum persists across rounds. With no active client the model and momentum are unchanged.

Pseudo-labels (``make_hard_pseudo_label``): ``labels = argmax p``, ``mask = max p >= tau``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedsim.errors import AggregationError, ConfigError

__all__ = [
    "ServerMomentum",
    "average_parameters",
    "combine_bn_statistics",
    "is_averaged_key",
    "mask_rate",
    "pseudo_label",
    "server_momentum_step",
]


def is_averaged_key(name: str) -> bool:
    """True for keys the SemiFL server averages: last dotted part contains ``weight`` or ``bias``.

    ``running_mean``, ``running_var`` and ``num_batches_tracked`` are excluded.
    """
    last = name.rsplit(".", 1)[-1]
    return "weight" in last or "bias" in last


def _keys(state: Mapping[str, Any], keys: Iterable[str] | None) -> list[str]:
    return [k for k in state if is_averaged_key(k)] if keys is None else list(keys)


def average_parameters(client_states: Sequence[Mapping[str, np.ndarray]],
                       keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Unweighted mean of the clients' arrays for ``keys`` (default: weight/bias keys), float64."""
    if not client_states:
        raise AggregationError("SemiFL: no client model to average", "skip the update when no client trained")
    keys = _keys(client_states[0], keys)
    out = {}
    for k in keys:
        arrays = []
        for i, c in enumerate(client_states):
            if k not in c:
                raise AggregationError(f"SemiFL: client {i} lacks parameter '{k}'",
                                       "all clients must return the same model")
            arrays.append(np.asarray(c[k], dtype=np.float64))
        if any(a.shape != arrays[0].shape for a in arrays):
            raise AggregationError(f"SemiFL: parameter '{k}' has different shapes across clients", None)
        out[k] = np.mean(arrays, axis=0)
    return out


def server_momentum_step(global_state: Mapping[str, np.ndarray], client_states: Sequence[Mapping[str, np.ndarray]],
                         momentum_buffer: Mapping[str, np.ndarray] | None = None, lr: float = 1.0,
                         momentum: float = 0.5, keys: Iterable[str] | None = None):
    """One SemiFL global step; returns ``(new_global_state, new_momentum_buffer)``.

    Keys outside ``keys`` (default: non weight/bias keys such as BN buffers) are copied unchanged.
    With no client the inputs are returned unchanged (copies).
    """
    if lr <= 0 or not 0 <= momentum < 1:
        raise ConfigError("strategy.global_momentum", f"need lr > 0 and 0 <= momentum < 1, got lr={lr}, "
                          f"momentum={momentum}")
    new_state = {k: np.array(v, copy=True) for k, v in global_state.items()}
    buffer = {k: np.array(v, copy=True) for k, v in (momentum_buffer or {}).items()}
    if not client_states:
        return new_state, buffer
    keys = _keys(global_state, keys)
    mean = average_parameters(client_states, keys)
    for k in keys:
        w = np.asarray(global_state[k])
        d = w.astype(np.float64) - mean[k]
        v = momentum * buffer[k] + d if k in buffer else d
        buffer[k] = v
        new_state[k] = (w.astype(np.float64) - lr * v).astype(w.dtype)
    return new_state, buffer


class ServerMomentum:
    """Stateful :func:`server_momentum_step` (momentum buffer kept across rounds, resumable)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.5) -> None:
        self.lr, self.momentum = float(lr), float(momentum)
        self.buffer: dict[str, np.ndarray] = {}

    def step(self, global_state, client_states, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        new_state, self.buffer = server_momentum_step(global_state, client_states, self.buffer, self.lr,
                                                      self.momentum, keys)
        return new_state

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "buffer": {k: v.copy() for k, v in self.buffer.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lr, self.momentum = float(state["lr"]), float(state["momentum"])
        self.buffer = {k: np.array(v, copy=True) for k, v in state["buffer"].items()}


def pseudo_label(probs, tau: float):
    """``(mask, labels)``: ``labels = argmax p``, ``mask = max p >= tau`` (torch tensor or NumPy array).

    ``tau > 1`` masks everything (the client then sits out the round).
    """
    if hasattr(probs, "max") and hasattr(probs, "argmax") and type(probs).__module__.startswith("torch"):
        conf, labels = probs.max(dim=-1)
        return conf >= tau, labels
    probs = np.asarray(probs)
    return probs.max(axis=-1) >= tau, probs.argmax(axis=-1)


def mask_rate(probs, tau: float) -> float:
    """Fraction of samples whose confidence reaches ``tau``."""
    mask, _ = pseudo_label(probs, tau)
    total = int(mask.numel()) if hasattr(mask, "numel") else int(np.size(mask))
    return int(mask.sum()) / total if total else 0.0


def combine_bn_statistics(client_stats: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray, int]]]
                          ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Federated static BN: ``layer -> (running_mean, running_var)`` from per-client sums.

    Each client reports, per BN layer, ``(sum_b mean_b, sum_b var_b, n_batches)`` from one train-mode
    pass (``var_b`` unbiased). The result is the cumulative average over ALL batches, which is what
    ``BatchNorm(momentum=None, track_running_stats=True)`` computes on the concatenated passes.
    """
    if not client_stats:
        raise AggregationError("sBN: no client statistics", "at least one client must report BN sums")
    out = {}
    for layer in client_stats[0]:
        sum_mean = sum(np.asarray(c[layer][0], dtype=np.float64) for c in client_stats)
        sum_var = sum(np.asarray(c[layer][1], dtype=np.float64) for c in client_stats)
        batches = sum(int(c[layer][2]) for c in client_stats)
        if batches <= 0:
            raise AggregationError(f"sBN: layer '{layer}' saw no batch", None)
        out[layer] = (sum_mean / batches, sum_var / batches)
    return out
