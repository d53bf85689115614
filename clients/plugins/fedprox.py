"""FedProx proximal term as a client plugin.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous Networks",
MLSys 2020 (arXiv 1812.06127). Each local step minimises ``F_k(w) + (mu/2) * ||w - w_global||^2``.

The server may send ``proximal-mu`` in the round config (Flower's FedProx strategy does); it then
takes precedence over the plugin setting. ``mu = 0`` is the neutral setting: no term is added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin


@register_plugin
class FedProx(ClientPlugin):
    name = "fedprox"
    events = frozenset({Event.ROUND_START, Event.LOSS})
    bench_overrides = ('client.plugins=["fedprox"]', "client.fedprox.mu=0.1")

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        mu: float = 0.01

        def __post_init__(self) -> None:
            if self.mu < 0:
                raise ValueError(f"mu must be >= 0, got {self.mu}")

        @classmethod
        def neutral(cls) -> "FedProx.Settings":
            return cls(mu=0.0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._anchor: list[torch.Tensor] = []
        self._mu = 0.0

    def on(self, event: Event, state: TrainState) -> None:
        if event is Event.ROUND_START:
            self._mu = float(state.config.get("proximal-mu", self.settings.mu))
            self._anchor = [p.detach().clone() for p in state.model.parameters()]
            return
        if self._mu == 0.0:
            return
        prox = sum(((p - a) ** 2).sum() for p, a in zip(state.model.parameters(), self._anchor))
        state.add_loss("fedprox", 0.5 * self._mu * prox)
