"""FedLD's margin-control regulariser: the functional form, then the client plugin that applies it.

Reference
---------
Zeng et al., "Tackling Data Heterogeneity in Federated Learning via Loss Decomposition", MICCAI 2024
(arXiv 2408.12300); official code Zeng-Shuang/FedLD, ``methods/fedld.py::MarginalLogLoss``.
Spec: ``server-algorithms.md`` section 1, "Client loss".

For logits ``Z`` (``B x C``) and ``P = softmax(Z)`` the client minimises
``CE_mean(Z, y) + lambda * log(1 + ||P||_F^2)``. In the reference code the squared norm is taken over
the WHOLE batch (``torch.norm(softmax, p=2)`` flattens the matrix), which is the default here; the
per-sample form ``mean_i log(1 + sum_c p_ic^2)`` is available with ``per_sample=True``.
The penalty is smallest for flat predictions, so it caps over-confident margins.

The local loop already computes the ``CE_mean`` term (``"ce"``); the plugin adds
``lambda * margin_penalty(Z)`` as the named term ``"fedld_margin"``. ``lam = 0`` is neutral (no term
is added).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin

__all__ = ["FedLDMargin", "margin_penalty"]


def margin_penalty(logits: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """``log(1 + ||softmax(logits)||_F^2)`` over the batch, or its per-sample mean.

    Parameters
    ----------
    logits
        ``(B, C)`` tensor.
    per_sample
        False (reference code): one log over the batch-wide Frobenius norm.
        True: ``mean_i log(1 + ||p_i||^2)``.

    Examples
    --------
    Uniform predictions (``p_ic = 1/C``) give ``log(1 + B/C)`` (batch form) and ``log(1 + 1/C)``
    (per-sample form).
    """
    if logits.ndim != 2:
        raise ValueError(f"margin_penalty expects (batch, classes) logits, got shape {tuple(logits.shape)}")
    p = torch.softmax(logits, dim=1)
    if per_sample:
        return torch.log1p((p * p).sum(dim=1)).mean()
    return torch.log1p((p * p).sum())


@register_plugin
class FedLDMargin(ClientPlugin):
    """Adds ``lam * margin_penalty(outputs)`` to the loss; the server's ``fedld-lambda`` overrides ``lam``.

    The reference's ``options.py`` default is ``lam = 0.03`` (its README run uses 0.1).
    """

    name = "fedld_margin"
    events = frozenset({Event.LOSS})
    bench_overrides = ('client.plugins=["fedld_margin"]',)

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
