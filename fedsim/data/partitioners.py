"""Partitioners: split a labelled training set among clients, with Flower Datasets' names.

A partitioner is ``fn(labels, num_partitions, rng, **params) -> list[np.ndarray]``: one sorted
``int64`` index array per partition. Partitions are disjoint and, unless a partitioner says
otherwise, cover every index. Parameters mirror ``flwr_datasets.partitioner`` (``IidPartitioner``,
``DirichletPartitioner``, ``PathologicalPartitioner``, ``ShardPartitioner``,
``NaturalIdPartitioner``); ``partition_by``/``shuffle``/``seed`` are replaced by the labels array
and the ``rng``. Impossible requests raise typed errors naming the scenario key, never loop.

The label-skew partitioners live in :mod:`fedsim.data.label_skew`; :mod:`fedsim.data.builtin`
imports both modules, so ``PARTITIONERS`` is complete once ``fedsim.data`` is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from fedsim.data import _checks
from fedsim.data.splits import group_by_owner, largest_remainder
from fedsim.errors import ConfigError, DataError
from fedsim.registry import Registry

Partitioner = Callable[..., list[np.ndarray]]
PARTITIONERS: Registry[Partitioner] = Registry("partitioner")

PARTITIONER_KEY = "data.partitioner"
PARTITION_PREFIX = "data.partition"
NUM_PARTITIONS_KEY = "data.num_clients"


def partition_key(param: str) -> str:
    """The scenario key of a partitioner parameter: ``data.partition.<param>``."""
    return f"{PARTITION_PREFIX}.{param}"


def check_min_partition_size(num_samples: int, num_partitions: int, min_size: int) -> None:
    """Raise a :class:`~fedsim.errors.DataError` if ``num_partitions`` partitions of at least
    ``min_size`` samples (``data.partition.min_partition_size``) cannot be cut from ``num_samples``."""
    if num_partitions * min_size > num_samples:
        key = partition_key("min_partition_size")
        raise DataError(f"{key}: {num_partitions} partitions of at least {min_size} "
                        f"samples need {num_partitions * min_size}, but there are {num_samples}",
                        f"lower {key} to at most {num_samples // num_partitions} "
                        f"or use fewer clients ({NUM_PARTITIONS_KEY})")


def register_partitioner(name: str, hidden: tuple[str, ...] = ()) -> Callable[[Partitioner], Partitioner]:
    """Register ``fn(labels, num_partitions, rng, **params)`` under ``name``.

    The registered function validates the labels and ``num_partitions`` and rejects unknown or
    missing parameters with a :class:`~fedsim.errors.ConfigError` naming ``data.partition.<key>``.
    """

    def deco(fn: Partitioner) -> Partitioner:
        checked = _checks.with_checked_keywords(PARTITION_PREFIX, skip=3, hidden=hidden)(fn)

        @functools.wraps(fn)
        def run(labels: np.ndarray, num_partitions: int, rng: np.random.Generator, **params) -> list[np.ndarray]:
            labels = np.asarray(labels)
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
                raise DataError(f"labels to partition must be a 1-D array of non-negative integers, got "
                                f"dtype {labels.dtype} and shape {labels.shape}", "encode labels as 0..K-1")
            num_partitions = _checks.positive_int(NUM_PARTITIONS_KEY, num_partitions)
            if num_partitions > len(labels):
                raise DataError(f"{NUM_PARTITIONS_KEY}: {num_partitions} partitions but only {len(labels)} "
                                "samples to share, so some would be empty",
                                f"use at most {len(labels)} clients or a larger dataset")
            return checked(labels, num_partitions, rng, **params)

        return PARTITIONERS.register(name)(run)

    return deco


#: a `module:object` partitioner not registered by its module gets the same checks (fedsim.registry)
PARTITIONERS.adopt = lambda name, fn: register_partitioner(name)(fn)


def partition(name: str, labels: np.ndarray, num_partitions: int, rng: np.random.Generator,
              params: dict | None = None, natural_ids: np.ndarray | None = None,
              features: np.ndarray | Callable[[], np.ndarray] | None = None) -> list[np.ndarray]:
    """Run the registered partitioner ``name`` (``data.partitioner``) with ``data.partition`` params.

    ``natural_ids`` (the dataset's owner id per sample) and ``features`` (its training inputs, or a
    callable that returns them, called only for a partitioner that takes them) are passed to
    partitioners that take them.
    """
    fn = PARTITIONERS.get(name, key=PARTITIONER_KEY)
    params = dict(params or {})
    for key in ("natural_ids", "features"):
        if key in params:
            raise ConfigError(partition_key(key), "is taken from the dataset, not from the scenario",
                              f"remove {partition_key(key)}")
    if "natural_ids" in _checks.keyword_names(fn, skip=3):
        params["natural_ids"] = natural_ids
    if "features" in _checks.keyword_names(fn, skip=3):
        params["features"] = features() if callable(features) else features
    return fn(labels, num_partitions, rng, **params)




@register_partitioner("iid")
def iid(labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random partitions of equal size (±1), like Flower's ``IidPartitioner``."""
    owner = np.empty(len(labels), dtype=np.int64)
    owner[rng.permutation(len(labels))] = np.arange(len(labels)) % num_partitions
    return group_by_owner(owner, num_partitions)


@register_partitioner("quantity")
def quantity(labels: np.ndarray, num_partitions: int, rng: np.random.Generator, power: float = 1.0,
             min_partition_size: int = 1) -> list[np.ndarray]:
    """Quantity skew: partition sizes follow a power law, labels stay IID.

    The partition of rank ``r`` (1 = largest; ranks are assigned to partitions at random) gets
    ``min_partition_size + (N - P·min_partition_size) · r^-power / Σ_j j^-power`` samples,
    rounded by largest remainder. ``power = 0`` gives equal sizes; larger powers more skew
    (Zipf's law at 1, cf. Flower's Linear/Square/Exponential size partitioners).
    """
    power = _checks.real(partition_key("power"), power, low=0.0)
    min_size = _checks.int_at_least(partition_key("min_partition_size"), min_partition_size, 0)
    check_min_partition_size(len(labels), num_partitions, min_size)
    spare = len(labels) - num_partitions * min_size
    sizes_by_rank = min_size + largest_remainder(spare, np.arange(1, num_partitions + 1) ** -power)
    sizes = sizes_by_rank[rng.permutation(num_partitions)]
    owner = np.empty(len(labels), dtype=np.int64)
    owner[rng.permutation(len(labels))] = np.repeat(np.arange(num_partitions), sizes)
    return group_by_owner(owner, num_partitions)


@register_partitioner("natural", hidden=("natural_ids",))
def natural(labels: np.ndarray, num_partitions: int, rng: np.random.Generator,
            natural_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Partitions by the data's natural owner (user, writer, device), like ``NaturalIdPartitioner``.

    With as many partitions as owners, partition ``i`` holds the ``i``-th owner (ids sorted);
    with fewer, consecutive owners are grouped (as ``GroupedNaturalIdPartitioner`` does). The
    result does not depend on ``rng``: the natural split is a property of the data.
    """
    if natural_ids is None:
        raise DataError(f"{PARTITIONER_KEY}: 'natural' needs a dataset with natural ids (an owner per sample), "
                        "and this one has none",
                        "use dataset 'synthetic', an npz file with a 'natural_ids' array, or another partitioner")
    natural_ids = np.asarray(natural_ids)
    if natural_ids.shape != labels.shape:
        raise DataError(f"natural_ids has shape {natural_ids.shape} but labels have {labels.shape}",
                        "give one owner id per training sample")
    owners, owner_of_sample = np.unique(natural_ids, return_inverse=True)
    if num_partitions > len(owners):
        raise DataError(f"{NUM_PARTITIONS_KEY}: {num_partitions} partitions but the data has only "
                        f"{len(owners)} natural owners", f"set {NUM_PARTITIONS_KEY} to at most {len(owners)}")
    group_sizes = [len(g) for g in np.array_split(np.arange(len(owners)), num_partitions)]
    partition_of_owner = np.repeat(np.arange(num_partitions), group_sizes)
    return group_by_owner(partition_of_owner[owner_of_sample], num_partitions)

