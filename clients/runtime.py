"""Per-process client runtime: the scenario, its federation, one model and resident data tensors.

Built once per process and per scenario (Ray reuses actor processes across virtual clients; the
deployment engine starts a fresh process per message), so nothing client-specific lives here
except caches keyed by partition id. Per-client state belongs in Flower's ``context.state``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedsim.config import Scenario, loads_scenario
from fedsim.data.federation import Federation, federation_of
from fedsim.errors import DataError
from fedsim.models import build_model, resolve_device, to_fast_layout
from fedsim.rng import derive_seed
from fedsim.wire import to_numpy


#: bytes of client tensors a process keeps resident (every client of the small built-in federations)
DATA_CACHE_BYTES = 256 * 2**20


@dataclass
class ClientRuntime:
    scenario: Scenario
    device: torch.device
    model: torch.nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    _data: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _extra: dict[str, object] = field(default_factory=dict)
    _data_bytes: int = 0

    @property
    def federation(self) -> Federation:
        return federation_of(self.scenario)

    def client_data(self, partition_id: int, data_path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This client's training tensors, on the device, cached per process.

        The cache holds at most ``DATA_CACHE_BYTES`` (the oldest clients are dropped first and
        rebuilt from the federation, identically, when sampled again), so a run over 10⁵ clients
        does not end up holding a tensor copy of every client's data.
        """
        if partition_id not in self._data:
            if data_path:
                x, y = load_local_npz(data_path)
            else:
                fed = self.federation
                if not 0 <= partition_id < len(fed.client_indices):
                    raise DataError(
                        f"partition-id {partition_id} is outside 0..{len(fed.client_indices) - 1}",
                        "set data.num_clients to the number of nodes, or fix the node's partition-id",
                    )
                x, y = fed.client_data(partition_id)
            self._data[partition_id] = (
                torch.tensor(np.asarray(x), dtype=torch.float32, device=self.device),
                torch.tensor(np.asarray(y), dtype=torch.long, device=self.device),
            )
            self._data_bytes += sum(t.nbytes for t in self._data[partition_id])
            while self._data_bytes > DATA_CACHE_BYTES and len(self._data) > 1:  # forget the oldest clients
                oldest = next(iter(self._data))
                self._data_bytes -= sum(t.nbytes for t in self._data.pop(oldest))
        return self._data[partition_id]

    def decoded(self, arrays) -> dict[str, torch.Tensor]:
        """Tensors of a received ArrayRecord, decoded once per record (all clients of a round on
        the local engine receive the same record object)."""
        held = self._extra.get("_decoded")
        if held is not None and held[0] is arrays:
            return held[1]
        tensors = {k: torch.from_numpy(to_numpy(v).copy()) for k, v in arrays.items()}
        self._extra["_decoded"] = (arrays, tensors)
        return tensors

    def cache(self, key: str, make):
        if key not in self._extra:
            self._extra[key] = make()
        return self._extra[key]


def load_local_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A real node's own data: an ``.npz`` with ``x_train`` and ``y_train``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"node data file '{path}' not found", "fix the node's data-path in --node-config")
    with np.load(p) as z:
        missing = [k for k in ("x_train", "y_train") if k not in z]
        if missing:
            raise DataError(f"'{path}' lacks key(s) {missing}", "save the file with x_train and y_train")
        return z["x_train"].astype(np.float32), z["y_train"].astype(np.int64)


@functools.lru_cache(maxsize=4)
def _runtime_for_text(text: str) -> ClientRuntime:
    return _build(loads_scenario(text))


_BY_ID: dict[int, ClientRuntime] = {}


def runtime_for(scenario: Scenario | None = None, text: str | None = None) -> ClientRuntime:
    """The process-wide runtime for a scenario object (local/Ray) or its TOML text (deployment)."""
    if scenario is None:
        if not text:
            raise DataError("the ClientApp got no scenario", "launch runs with `fedsim run` or `fedsim deploy`")
        return _runtime_for_text(text)
    key = id(scenario)
    if key not in _BY_ID:
        _BY_ID.clear()
        _BY_ID[key] = _build(scenario)
    return _BY_ID[key]


def _build(scenario: Scenario) -> ClientRuntime:
    torch.set_num_threads(scenario.run.threads)
    device = resolve_device(scenario.run.device)
    fed = federation_of(scenario)
    shape, classes = tuple(fed.input_shape), int(fed.num_classes)
    model = to_fast_layout(build_model(scenario.model, shape, classes, derive_seed(scenario.run.seed, "model-init")),
                           device)
    return ClientRuntime(scenario=scenario, device=device, model=model, input_shape=shape, num_classes=classes)
