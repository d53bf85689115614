"""Hard batches (DyBAT): after one full pass, train only on the mini-batches with the highest recorded loss.

Reference
---------
Sahayam, Zakkam, Jayaraman, "Can we learn better with hard samples?", 2023 (arXiv 2304.03486); code
imjohnzakkam/DyBAT (``run.py``). Spec: ``client-plugins.md`` §B.3.

The rule: the batch identities are fixed (``b = ⌊n/B⌋`` batches of ``B`` examples, the last partial one
dropped). The first pass trains on every batch and records its loss ``L_i``. Then, repeatedly: sort by
``L_i`` (highest first), select the top ``k = max(1, ⌊δ·b⌋)`` batch ids, visit them in id order and take
one step on each, overwriting ``L_i`` with the loss computed at that step (before the update); the losses
of unselected batches stay stale. The number of optimizer steps is the plain run's (each local epoch
yields as many steps as the plain epoch would, ``⌈n/B⌉``, and ``client.max_steps`` still caps them).

On a federated client the reference's unshuffled loader becomes one fixed random assignment of examples
to batches per client (``fedsim.rng.torch_generator(seed, "hard_batches", client)``: partitions are
often stored sorted by label, and contiguous blocks would be single-class batches). The losses and the
position inside the current pass persist per client across rounds, as the batch partition is fixed.
``delta = 1`` is neutral: the plugin does nothing and the plain random batches are used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.clients.plugin_api import ClientPlugin, Event, TrainState, register_plugin
from fedsim.rng import torch_generator

__all__ = ["HardBatches", "fixed_batches", "select_hard"]


def fixed_batches(n: int, batch_size: int, seed: int, client_id: int) -> list[torch.Tensor]:
    """The client's fixed batch identities: one seeded permutation cut into ``⌊n/B⌋`` full batches
    (``drop_last``; a client with fewer than ``B`` examples has one batch of all of them)."""
    perm = torch.randperm(n, generator=torch_generator(seed, "hard_batches", client_id))
    if n < batch_size:
        return [perm]
    return list(perm[: (n // batch_size) * batch_size].split(batch_size))


def select_hard(losses: np.ndarray, delta: float) -> np.ndarray:
    """Ids of the ``max(1, ⌊δ·b⌋)`` highest-loss batches (ties by id), in ascending id order."""
    losses = np.asarray(losses, dtype=np.float64)
    k = max(1, int(math.floor(delta * losses.shape[0] + 1e-9)))
    return np.sort(np.argsort(-losses, kind="stable")[:k])


@register_plugin
class HardBatches(ClientPlugin):
    """Train on the top-δ highest-loss fixed mini-batches with the plain step budget (DyBAT)."""

    name = "hard_batches"
    events = frozenset({Event.ROUND_START, Event.SAMPLER, Event.AFTER_STEP, Event.ROUND_END})
    owns = frozenset({"sampler"})
    bench_scenario = "default"
    bench_overrides = ('client.plugins=["hard_batches"]', "client.hard_batches.delta=0.5")
    bench_metric = "test_accuracy"

    @dataclass(frozen=True)
    class Settings(ClientPlugin.Settings):
        #: fraction of the fixed batches selected in each pass after the first (1 = plain training)
        delta: float = 0.5

        def __post_init__(self) -> None:
            if not 0.0 < self.delta <= 1.0:
                raise ValueError(f"delta must be in (0, 1], got {self.delta}")

        @classmethod
        def neutral(cls) -> "HardBatches.Settings":
            return cls(delta=1.0)

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._batches: list[torch.Tensor] = []
        self.losses: np.ndarray | None = None  # recorded loss per batch id (NaN: never trained on)
        self.pending: list[int] = []  # batch ids still to visit in the current pass
        self.visited: list[int] = []  # batch ids trained on this round, in order (metrics, tests)
        self._current: int | None = None

    def on(self, event: Event, state: TrainState) -> None:
        if self.settings.delta >= 1.0:
            return
        if event is Event.ROUND_START:
            n = int(state.x.shape[0])
            self._batches = [b.to(state.device) for b in fixed_batches(n, state.batch_size, state.seed,
                                                                          state.client_id)]
            if self.losses is None or self.losses.shape[0] != len(self._batches):
                self.losses = np.full(len(self._batches), np.nan)
                self.pending = list(range(len(self._batches)))  # the first, full pass
            self.visited = []
        elif event is Event.SAMPLER:
            steps = -(-int(state.order.shape[0]) // state.batch_size)  # the plain epoch's step count
            state.batches = _Schedule(self, steps)
        elif event is Event.AFTER_STEP and self._current is not None and state.loss is not None:
            self.losses[self._current] = float(state.loss.detach())
        elif event is Event.ROUND_END:
            self._current = None
            state.metrics["hard_batches/selected"] = float(len(select_hard(self.losses, self.settings.delta)))

    def _next_id(self) -> int:
        if not self.pending:
            self.pending = [int(i) for i in select_hard(self.losses, self.settings.delta)]
        return self.pending.pop(0)

    def state_dict(self) -> dict:
        if self.losses is None:
            return {}
        return {"losses": self.losses.copy(), "pending": np.asarray(self.pending, dtype=np.int64)}

    def load_state_dict(self, state: dict) -> None:
        if "losses" in state:
            self.losses = np.asarray(state["losses"], dtype=np.float64).copy()
            self.pending = [int(i) for i in np.asarray(state.get("pending", []), dtype=np.int64).reshape(-1)]


class _Schedule:
    """The epoch's batches, chosen lazily: each pick sees the losses recorded at the previous steps."""

    def __init__(self, plugin: HardBatches, steps: int) -> None:
        self.plugin, self.steps = plugin, steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            i = self.plugin._next_id()
            self.plugin._current = i
            self.plugin.visited.append(i)
            yield self.plugin._batches[i]
