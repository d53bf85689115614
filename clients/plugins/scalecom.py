"""ScaleCom's client side: the error-compensated update and its low-pass filtered memory.

Chen et al., "ScaleCom: Scalable Sparsified Gradient Compression for Communication-Efficient
Distributed Training", NeurIPS 2020. In a federated round the "gradient" is the local update
``Δ = w_local - w_global`` over the model's floating tensors (parameters and float buffers).
At ``ROUND_END`` the plugin forms ``a = m + Δ``; the ``scalecom`` strategy's second exchange then
gives the leader's indices ``I``, the client sends ``a[I]`` and keeps
``m' = (1 - β) m + β (a - C(a))`` (:mod:`fedsim.strategies.scalecom_math`). The memory persists
per client across rounds in its ``context.state``; a client that is not sampled keeps it unchanged.

The plugin has no settings (density and β are the strategy's, ``strategy.density`` /
``strategy.beta``): it runs only under ``strategy.name = "scalecom"``, which enables it, and is
refused with any other strategy (it would hold a memory nothing sends).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.errors import ConfigError
from fedsim.strategies.scalecom_math import compress, ef_update


def float_state(model: torch.nn.Module) -> np.ndarray:
    """The model's floating state-dict entries, flattened in state-dict order (float32)."""
    parts = [v.detach().cpu().reshape(-1).to(torch.float32) for v in model.state_dict().values()
             if v.is_floating_point()]
    return torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)


@register_plugin
class ScaleCom(ClientPlugin):
    name = "scalecom"
    events = frozenset({Event.ROUND_START, Event.ROUND_END})
    tiny_overrides = ('strategy.name="scalecom"',)
    bench_scenario = "default"
    bench_overrides = ('strategy.name="scalecom"', "strategy.density=0.1")
    bench_metric = "test_accuracy"

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.memory: np.ndarray | None = None
        self.pending: np.ndarray | None = None  # a = m + Δ of the last local round, until it is sent
        self.counts = np.zeros(2, np.int64)  # (num-examples, steps) of that round
        self._start: np.ndarray | None = None

    def preflight(self, scenario: Any) -> None:
        if scenario.strategy.name != "scalecom":
            raise ConfigError("client.plugins", f"plugin 'scalecom' needs strategy.name = \"scalecom\" (got "
                              f"\"{scenario.strategy.name}\"): its memory is sent by that strategy only",
                              "set strategy.name = \"scalecom\" (it enables the plugin) and remove 'scalecom' "
                              "from client.plugins")

    def on(self, event: Event, state: TrainState) -> None:
        if event is Event.ROUND_START:
            self._start = float_state(state.model)
        elif event is Event.ROUND_END and self._start is not None:
            delta = float_state(state.model) - self._start
            self.pending = delta if self.memory is None else self.memory + delta
            self._start = None

    def send(self, indices: np.ndarray, beta: float) -> np.ndarray:
        """Values ``a[I]`` of the pending update; the memory becomes the filtered residual."""
        if self.pending is None:
            raise RuntimeError("scalecom: no local update is pending (the training exchange did not reach "
                               "this client in this round)")
        acc = self.pending
        values = compress(acc, indices).astype(np.float32)
        self.memory = ef_update(self.memory if self.memory is not None else np.zeros_like(acc), acc, indices, beta)
        self.pending = None
        return values

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"counts": self.counts}
        if self.memory is not None:
            out["memory"] = self.memory
        if self.pending is not None:
            out["pending"] = self.pending
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = np.asarray(state["memory"]).copy() if "memory" in state else None
        self.pending = np.asarray(state["pending"]).copy() if "pending" in state else None
        if "counts" in state:
            self.counts = np.asarray(state["counts"], dtype=np.int64).copy()
