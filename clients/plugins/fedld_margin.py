"""FedLD's margin-control regulariser as a client plugin.

Zeng et al., "Tackling Data Heterogeneity in Federated Learning via Loss Decomposition",
MICCAI 2024 (arXiv 2408.12300). Adds ``lam · log(1 + ||softmax(Z)||_F^2)`` to the loss; the
default is the reference code's batch form (the norm over the whole batch), ``per_sample = true``
averages the per-sample penalty instead. ``lam = 0`` is neutral (no term is added).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.clients.fedld_loss import margin_penalty
from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin


@register_plugin
class FedLDMargin(ClientPlugin):
    name = "fedld_margin"
    events = frozenset({Event.LOSS})

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        lam: float = 0.03
        per_sample: bool = False

        def __post_init__(self) -> None:
            if self.lam < 0:
                raise ValueError(f"lam must be >= 0, got {self.lam}")

        @classmethod
        def neutral(cls) -> "FedLDMargin.Settings":
            return cls(lam=0.0)

    def on(self, event: Event, state: TrainState) -> None:
        lam = float(state.config.get("fedld-lambda", self.settings.lam))
        if lam:
            state.add_loss("fedld_margin", lam * margin_penalty(state.outputs, per_sample=self.settings.per_sample))
