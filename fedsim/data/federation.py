"""A federation: one dataset split into client shards, a server labelled set and a test set.

Every client process rebuilds the same federation from the scenario and the seed (no data is
shipped from the server), so :func:`make_federation` is deterministic and cached per process.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np

from fedsim.data import _checks
from fedsim.data.datasets import Dataset, load_dataset
from fedsim.data.label_noise import LABEL_NOISE_KEY, with_label_noise
from fedsim.data import partitioners
from fedsim.data.partitioners import NUM_PARTITIONS_KEY
from fedsim.data.splits import stratified_take
from fedsim.errors import ConfigError, DataError
from fedsim.rng import numpy_rng

SERVER_LABELLED_KEY = "data.server_labelled"


@dataclass(frozen=True, eq=False)
class Federation:
    """The data of one simulated federation (arrays are read-only and shared by clients).

    Attributes
    ----------
    dataset
        The full dataset; every index below points into ``dataset.x_train``/``y_train``.
    client_indices
        One sorted ``int64`` index array per client (disjoint).
    server_indices
        Labelled training samples held by the server (e.g. for SemiFL); disjoint from every
        client's, possibly empty.
    """

    dataset: Dataset
    client_indices: list[np.ndarray]
    server_indices: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset (some may be absent from a client)."""
        return self.dataset.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(1, 28, 28)``."""
        return self.dataset.input_shape

    @property
    def x_test(self) -> np.ndarray:
        return self.dataset.x_test

    @property
    def y_test(self) -> np.ndarray:
        return self.dataset.y_test

    def client_data(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of ``client`` (0-based partition id)."""
        indices = self.client_indices[client]
        return self.dataset.x_train[indices], self.dataset.y_train[indices]

    def server_data(self) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of the server's labelled split."""
        return self.dataset.x_train[self.server_indices], self.dataset.y_train[self.server_indices]

    def client_sizes(self) -> np.ndarray:
        return np.array([len(indices) for indices in self.client_indices], dtype=np.int64)


def make_federation(dataset: str, num_clients: int, partitioner: str = "iid", partition: dict | None = None,
                    options: dict | None = None, test_fraction: float = 0.2, server_labelled: int = 0,
                    seed: int = 0, label_noise: float = 0.0) -> Federation:
    """Build (or fetch from this process's cache) the federation a scenario describes.

    Parameters
    ----------
    dataset, options
        Registered dataset name (``data.dataset``) and its options (``data.options``).
    num_clients
        Number of client partitions (``data.num_clients``).
    partitioner, partition
        Registered partitioner name (``data.partitioner``) and its parameters (``data.partition``).
    test_fraction
        Share of the data held out for testing when the dataset has no test split of its own.
    server_labelled
        Number of training samples the server keeps (stratified by label, drawn before
        partitioning and excluded from every client).
    seed
        Root seed: the dataset, the server split and the partition each get their own stream.
    label_noise
        Fraction of training labels flipped to another class (``data.label_noise``,
        :mod:`fedsim.data.label_noise`), before the server split and the partition.

    Returns
    -------
    Federation
        The same object for the same arguments within a process; do not modify its arrays.
    """
    settings = {"dataset": dataset, "num_clients": num_clients, "partitioner": partitioner,
                "partition": partition or {}, "options": options or {}, "test_fraction": test_fraction,
                "server_labelled": server_labelled, "seed": seed, "label_noise": label_noise}
    try:
        key = json.dumps(settings, sort_keys=True, default=_plain)
    except (TypeError, ValueError) as err:
        raise ConfigError("data", f"settings must be plain numbers, strings, lists and tables ({err})",
                          "remove objects from data.options / data.partition") from err
    return _cached_federation(key)


def federation_of(scenario: Any) -> Federation:
    """The federation of ``scenario`` (its ``[data]`` table and ``run.seed``), from this process's cache."""
    d = scenario.data
    return make_federation(dataset=d.dataset, num_clients=d.num_clients, partitioner=d.partitioner,
                           partition=d.partition, options=d.options, test_fraction=d.test_fraction,
                           server_labelled=d.server_labelled, seed=scenario.run.seed,
                           label_noise=getattr(d, "label_noise", 0.0))


def clear_federation_cache() -> None:
    """Forget every cached federation (e.g. after rewriting an npz file)."""
    _cached_federation.cache_clear()


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a plain value")


@functools.lru_cache(maxsize=8)
def _cached_federation(key: str) -> Federation:
    return _build(**json.loads(key))


def _build(dataset: str, num_clients: int, partitioner: str, partition: dict, options: dict,
           test_fraction: float, server_labelled: int, seed: int, label_noise: float = 0.0) -> Federation:
    data = load_dataset(dataset, seed, test_fraction, options)
    num_clients = _checks.positive_int(NUM_PARTITIONS_KEY, num_clients)
    server_labelled = _checks.int_at_least(SERVER_LABELLED_KEY, server_labelled, 0)
    if num_clients > data.num_train:
        raise DataError(f"{NUM_PARTITIONS_KEY}: {num_clients} clients but '{data.name}' has only {data.num_train} "
                        "training samples, so some clients would get none",
                        f"use at most {data.num_train} clients or a larger dataset (data.options)")
    if server_labelled > data.num_train - num_clients:
        raise DataError(f"{SERVER_LABELLED_KEY}: the server would keep {server_labelled} of {data.num_train} "
                        f"training samples, leaving fewer than one per client ({num_clients} clients)",
                        f"lower {SERVER_LABELLED_KEY} to at most {max(data.num_train - num_clients, 0)}")
    if hasattr(data, "users"):  # generated per user on demand (synthetic with lazy = true)
        if label_noise:
            raise ConfigError(LABEL_NOISE_KEY, "cannot flip labels of data generated one user at a time",
                              f"set {LABEL_NOISE_KEY} = 0 or data.options.lazy = false")
        return _lazy_federation(data, num_clients, partitioner, partition, server_labelled)
    data = with_label_noise(data, label_noise, numpy_rng(seed, "label-noise"))
    server, pool = stratified_take(data.y_train, server_labelled, numpy_rng(seed, "server-split"))
    ids = None if data.natural_ids is None else data.natural_ids[pool]
    parts = partitioners.partition(partitioner, data.y_train[pool], num_clients, numpy_rng(seed, "partition"),
                                   partition, natural_ids=ids, features=lambda: data.x_train[pool])
    clients = [_read_only(pool[part]) for part in parts]
    for array in (data.x_train, data.y_train, data.x_test, data.y_test):
        array.setflags(write=False)
    return Federation(dataset=data, client_indices=clients, server_indices=_read_only(server))


def _lazy_federation(data: Dataset, num_clients: int, partitioner: str, partition: dict,
                     server_labelled: int) -> Federation:
    """Clients of a per-user generated dataset: the ``natural`` partition, computed from the user sizes
    alone (consecutive users grouped as :func:`fedsim.data.partitioners.natural` groups them), as views
    of one read-only ``arange`` so that no sample is generated and no index is stored twice."""
    lazy = "synthetic with data.options.lazy = true is generated one user at a time"
    if partitioner != "natural":
        raise ConfigError(partitioners.PARTITIONER_KEY, f"{lazy}, so only the 'natural' partitioner can split it "
                          f"(got '{partitioner}')", "set data.partitioner = \"natural\" or data.options.lazy = false")
    if partition:
        key = partitioners.partition_key(sorted(partition)[0])
        raise ConfigError(key, "the 'natural' partitioner takes no parameters", f"remove {key}")
    if server_labelled:
        raise ConfigError(SERVER_LABELLED_KEY, f"{lazy}; a stratified server split would generate all of it",
                          f"set {SERVER_LABELLED_KEY} = 0 or data.options.lazy = false")
    users = data.users
    if num_clients > users.num_users:
        raise DataError(f"{NUM_PARTITIONS_KEY}: {num_clients} partitions but the data has only "
                        f"{users.num_users} natural owners", f"set {NUM_PARTITIONS_KEY} to at most {users.num_users}")
    group_sizes = [len(g) for g in np.array_split(np.arange(users.num_users), num_clients)]
    first_user = np.concatenate([[0], np.cumsum(group_sizes)])
    bounds = users.train_starts[first_user]
    rows = _read_only(np.arange(users.num_train, dtype=np.int64))
    clients = [rows[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    return Federation(dataset=data, client_indices=clients, server_indices=_read_only(np.zeros(0, np.int64)))


def _read_only(indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    indices.setflags(write=False)
    return indices


def label_counts(federation: Federation) -> np.ndarray:
    """Samples per class for every client, shape ``(num_clients, num_classes)``."""
    labels = federation.dataset.y_train
    return np.stack([np.bincount(labels[indices], minlength=federation.num_classes)
                     for indices in federation.client_indices]).astype(np.int64)
