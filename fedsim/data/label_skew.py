"""Label-skew partitioners: ``dirichlet``, ``pathological`` and ``shard``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsim.data import _checks
from fedsim.data.partitioners import (
    NUM_PARTITIONS_KEY,
    check_min_partition_size,
    partition_key as _key,
    register_partitioner,
)
from fedsim.data.splits import group_by_owner
from fedsim.errors import ConfigError, DataError

MAX_DIRICHLET_REDRAWS = 10


def _concentrations(alpha: float | Sequence[float], num_labels: int) -> np.ndarray:
    """Alpha per class: a scalar for every class, or one value per class."""
    if isinstance(alpha, (list, tuple, np.ndarray)):
        values = np.array([_checks.real(f"{_key('alpha')}[{i}]", a, low=0.0, low_inclusive=False)
                           for i, a in enumerate(alpha)])
        if len(values) < num_labels:
            raise ConfigError(_key("alpha"), f"has {len(values)} entries but the labels go up to {num_labels - 1}",
                              "give one alpha per class (note: here a list is per class; Flower Datasets' "
                              "vector alpha is per partition), or a single number")
        return values
    return np.full(num_labels, _checks.real(_key("alpha"), alpha, low=0.0, low_inclusive=False))


def _dirichlet_draw(labels: np.ndarray, num_partitions: int, rng: np.random.Generator,
                    alphas: np.ndarray, self_balancing: bool) -> np.ndarray:
    """One draw: the partition of every sample."""
    owner = np.empty(len(labels), dtype=np.int64)
    sizes = np.zeros(num_partitions, dtype=np.int64)
    fair_size = len(labels) / num_partitions
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_partitions, alphas[label]))
        if not np.all(np.isfinite(shares)) or shares.sum() <= 0:  # underflow at tiny alpha
            shares = np.zeros(num_partitions)
            shares[rng.integers(num_partitions)] = 1.0
        if self_balancing and np.any(sizes <= fair_size):
            shares = np.where(sizes > fair_size, 0.0, shares)
            shares = shares / shares.sum() if shares.sum() > 0 else (sizes <= fair_size) / np.sum(sizes <= fair_size)
        cuts = (np.cumsum(shares) * len(members)).astype(np.int64)[:-1]
        for part, chunk in enumerate(np.split(members, cuts)):
            owner[chunk] = part
            sizes[part] += len(chunk)
    return owner


@register_partitioner("dirichlet")
def dirichlet(labels: np.ndarray, num_partitions: int, rng: np.random.Generator,
              alpha: float | Sequence[float] = 0.5, min_partition_size: int = 10,
              self_balancing: bool = False) -> list[np.ndarray]:
    """Label skew from a Dirichlet prior (Hsu et al., 2019), as Flower's ``DirichletPartitioner``.

    For every class ``k`` the shares of its samples over the partitions are drawn from
    ``Dir(alpha_k · 1)``: small ``alpha`` gives few classes per partition, large ``alpha`` nearly
    IID. ``alpha`` is one number or one per class (default 0.5; Flower has no default). With
    ``self_balancing`` a partition that already holds more than ``N / num_partitions`` samples
    gets no share of later classes.
    The draw is repeated while some partition has fewer than ``min_partition_size`` samples, at
    most ``MAX_DIRICHLET_REDRAWS`` times; then a :class:`~fedsim.errors.DataError` explains
    which setting to change (Flower's partitioner would warn and keep trying).

    References
    ----------
    Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", arXiv:1909.06335, 2019.
    """
    alphas = _concentrations(alpha, int(labels.max()) + 1)
    min_size = _checks.int_at_least(_key("min_partition_size"), min_partition_size, 0)
    self_balancing = _checks.boolean(_key("self_balancing"), self_balancing)
    check_min_partition_size(len(labels), num_partitions, min_size)
    smallest = 0
    for _ in range(1 + MAX_DIRICHLET_REDRAWS):
        owner = _dirichlet_draw(labels, num_partitions, rng, alphas, self_balancing)
        smallest = int(np.bincount(owner, minlength=num_partitions).min())
        if smallest >= min_size:
            return group_by_owner(owner, num_partitions)
    raise DataError(
        f"{_key('min_partition_size')}: after {1 + MAX_DIRICHLET_REDRAWS} Dirichlet draws with alpha={alpha}, "
        f"some partition still had only {smallest} of the required {min_size} samples "
        f"({len(labels)} samples over {num_partitions} partitions)",
        f"raise {_key('alpha')} (less skew), lower {_key('min_partition_size')}, use fewer clients "
        f"({NUM_PARTITIONS_KEY}) or set {_key('self_balancing')} = true",
    )


def _fill_classes(chosen: list[list[int]], num_classes: int, per_partition: int,
                  rng: np.random.Generator) -> list[list[int]]:
    """Complete each partition's class list to ``per_partition`` classes, covering every class.

    Classes no partition has yet are dealt first (random order, to random partitions with a free
    slot), then free slots take random classes the partition does not have.
    """
    used = {c for classes in chosen for c in classes}
    uncovered = [int(c) for c in rng.permutation(num_classes) if c not in used]
    partitions = rng.permutation(len(chosen))
    turn = 0
    while uncovered:
        part = partitions[turn % len(chosen)]
        if len(chosen[part]) < per_partition:
            chosen[part].append(uncovered.pop())
        turn += 1
    for classes in chosen:
        missing = per_partition - len(classes)
        if missing:
            free = np.setdiff1d(np.arange(num_classes), classes)
            classes.extend(int(c) for c in rng.choice(free, size=missing, replace=False))
    return chosen


def _assign_classes(num_classes: int, num_partitions: int, per_partition: int, mode: str,
                    rng: np.random.Generator) -> list[list[int]]:
    """Positions (into the sorted unique labels) of the classes of every partition."""
    if mode == "deterministic":
        unused = num_classes - (num_partitions + per_partition - 1)
        if unused > 0:
            raise DataError(f"{_key('class_assignment_mode')}: 'deterministic' gives partition i the classes "
                            f"i..i+{per_partition - 1}, which leaves {unused} classes unused",
                            f"use {_key('class_assignment_mode')} = \"random\" or more clients")
        return [[(p + j) % num_classes for j in range(per_partition)] for p in range(num_partitions)]
    if mode == "first-deterministic":
        start = [[p % num_classes] for p in range(num_partitions)]
    else:
        start = [[] for _ in range(num_partitions)]
    return _fill_classes(start, num_classes, per_partition, rng)


@register_partitioner("pathological")
def pathological(labels: np.ndarray, num_partitions: int, rng: np.random.Generator,
                 num_classes_per_partition: int, class_assignment_mode: str = "random") -> list[np.ndarray]:
    """Exactly ``num_classes_per_partition`` classes per partition, as ``PathologicalPartitioner``.

    ``class_assignment_mode``: ``"random"`` (random classes), ``"deterministic"`` (partition
    ``i`` gets classes ``i, i+1, …`` modulo the number of classes) or ``"first-deterministic"``
    (class ``i`` first, the rest random). Unlike Flower, the random modes always use every class
    (classes nobody drew are dealt first), so the partitions cover the data. Each class's
    samples are split evenly among the partitions that hold it.
    """
    per_partition = _checks.positive_int(_key("num_classes_per_partition"), num_classes_per_partition)
    mode = _checks.choice(_key("class_assignment_mode"), class_assignment_mode,
                          ("random", "deterministic", "first-deterministic"))
    classes, class_of_sample = np.unique(labels, return_inverse=True)
    if per_partition > len(classes):
        raise DataError(f"{_key('num_classes_per_partition')}: {per_partition} classes per partition but the "
                        f"data has only {len(classes)}", f"set {_key('num_classes_per_partition')} <= {len(classes)}")
    if num_partitions * per_partition < len(classes):
        raise DataError(f"{_key('num_classes_per_partition')}: {num_partitions} partitions × {per_partition} "
                        f"classes cannot hold all {len(classes)} classes; samples would be dropped",
                        f"raise {_key('num_classes_per_partition')} or {NUM_PARTITIONS_KEY}")
    assignment = _assign_classes(len(classes), num_partitions, per_partition, mode, rng)
    holders = [[p for p, owned in enumerate(assignment) if c in owned] for c in range(len(classes))]
    class_sizes = np.bincount(class_of_sample, minlength=len(classes))
    for c, parts in enumerate(holders):
        if len(parts) > class_sizes[c]:
            raise DataError(f"{_key('num_classes_per_partition')}: class {classes[c]} is assigned to "
                            f"{len(parts)} partitions but has only {class_sizes[c]} samples",
                            f"lower {_key('num_classes_per_partition')} or {NUM_PARTITIONS_KEY}, or use "
                            f"{_key('class_assignment_mode')} = \"deterministic\" for an even spread")
    owner = np.empty(len(labels), dtype=np.int64)
    for c, parts in enumerate(holders):
        members = rng.permutation(np.flatnonzero(class_of_sample == c))
        owner[members] = np.asarray(parts)[np.arange(len(members)) * len(parts) // len(members)]
    return group_by_owner(owner, num_partitions)


def _shard_layout(total: int, num_partitions: int, per_partition: int | None,
                  shard_size: int | None) -> tuple[int, int]:
    """``(num_shards_per_partition, shard_size)`` from whichever of the two is given."""
    if per_partition is None and shard_size is None:
        raise ConfigError(_key("num_shards_per_partition"), "shard needs num_shards_per_partition, "
                          "shard_size or both", f"set {_key('num_shards_per_partition')} = 2 (FedAvg's setting)")
    if per_partition is not None:
        per_partition = _checks.positive_int(_key("num_shards_per_partition"), per_partition)
    if shard_size is not None:
        shard_size = _checks.positive_int(_key("shard_size"), shard_size)
    if shard_size is None:
        shard_size = total // (num_partitions * per_partition)
        if shard_size == 0:
            raise DataError(f"{_key('num_shards_per_partition')}: {num_partitions} × {per_partition} shards "
                            f"cannot be cut from {total} samples", f"lower {_key('num_shards_per_partition')} "
                            f"or {NUM_PARTITIONS_KEY}")
    if per_partition is None:
        per_partition = total // (shard_size * num_partitions)
        if per_partition == 0:
            raise DataError(f"{_key('shard_size')}: {total} samples give fewer than {num_partitions} shards of "
                            f"{shard_size}", f"lower {_key('shard_size')} to at most {total // num_partitions}")
    if num_partitions * per_partition * shard_size > total:
        raise DataError(f"{_key('shard_size')}: {num_partitions} partitions × {per_partition} shards × {shard_size} "
                        f"samples need {num_partitions * per_partition * shard_size}, but there are {total}",
                        f"lower {_key('shard_size')} or {_key('num_shards_per_partition')}")
    return per_partition, shard_size


@register_partitioner("shard")
def shard(labels: np.ndarray, num_partitions: int, rng: np.random.Generator,
          num_shards_per_partition: int | None = None, shard_size: int | None = None,
          keep_incomplete_shard: bool = True) -> list[np.ndarray]:
    """Sort-and-shard (McMahan et al., 2017), as Flower's ``ShardPartitioner``.

    Samples are sorted by label (random order within a label) and cut into shards of
    ``shard_size`` consecutive samples; every partition gets ``num_shards_per_partition``
    random shards. Give either parameter (the other is derived) or both. FedAvg's MNIST
    setting is 100 partitions × 2 shards of 300.

    Shards the layout does not need (the incomplete last one and any spare full ones) are
    dealt one at a time to random partitions when ``keep_incomplete_shard`` is true, the
    default here, so every sample is assigned. With ``keep_incomplete_shard = false`` (Flower's
    default) they are **dropped**: all partitions then hold equal numbers of equal shards,
    but the partitions do not cover the data.

    References
    ----------
    McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017.
    """
    keep_incomplete_shard = _checks.boolean(_key("keep_incomplete_shard"), keep_incomplete_shard)
    per_partition, size = _shard_layout(len(labels), num_partitions, num_shards_per_partition, shard_size)
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    num_shards = -(-len(labels) // size)
    shard_of_position = np.arange(len(labels)) // size
    needed = num_partitions * per_partition
    full_shards = len(labels) // size  # the layout uses full shards only; a last incomplete one is spare
    shard_order = np.concatenate([rng.permutation(full_shards), np.arange(full_shards, num_shards)])
    shard_order[needed:] = rng.permutation(shard_order[needed:])
    owner_of_shard = np.full(num_shards, -1, dtype=np.int64)
    owner_of_shard[shard_order[:needed]] = np.repeat(np.arange(num_partitions), per_partition)
    if keep_incomplete_shard and num_shards > needed:
        spare = shard_order[needed:]
        receivers = np.concatenate([rng.permutation(num_partitions) for _ in range(-(-len(spare) // num_partitions))])
        owner_of_shard[spare] = receivers[: len(spare)]
    owner = np.empty(len(labels), dtype=np.int64)
    owner[by_label] = owner_of_shard[shard_of_position]
    return group_by_owner(owner, num_partitions)
