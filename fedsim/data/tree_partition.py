"""The ``tree`` partitioner: clients own the leaves of a decision tree, disjoint regions of feature space.

A CART tree (scikit-learn's ``DecisionTreeClassifier``: Breiman, Friedman, Olshen, Stone, "Classification
and Regression Trees", 1984) is grown best-first on the training features and labels with at most
``data.num_clients`` leaves (``max_leaf_nodes``). Its leaves are axis-aligned boxes that are mutually
exclusive and together cover the whole feature space, so every sample lies in exactly one; each leaf
becomes one client (leaves are assigned to client ids in a random order drawn from the partition's seed).
Clients therefore differ in *which inputs* they see (feature skew) and, because the tree splits where the
labels change, in their label mix too.

A tree stops splitting a node whose samples all share one label, or where a split would leave fewer than
``min_partition_size`` samples on a side; when it ends with fewer leaves than clients, the request is
refused with a :class:`~fedsim.errors.DataError` (never an empty client).
"""

from __future__ import annotations

import numpy as np

from fedsim.data import _checks
from fedsim.data.partitioners import NUM_PARTITIONS_KEY, PARTITIONER_KEY, partition_key, register_partitioner
from fedsim.data.splits import group_by_owner
from fedsim.errors import DataError

__all__ = ["tree", "tree_leaves"]


def tree_leaves(features: np.ndarray, labels: np.ndarray, max_leaves: int, min_leaf: int, seed: int) -> np.ndarray:
    """The leaf index (0..L-1, in the tree's own order) of every sample, for a tree of at most ``max_leaves``."""
    if max_leaves < 2:
        return np.zeros(len(labels), dtype=np.int64)
    from sklearn.tree import DecisionTreeClassifier

    model = DecisionTreeClassifier(max_leaf_nodes=max_leaves, min_samples_leaf=min_leaf, random_state=seed)
    node = model.fit(features, labels).apply(features)
    _, leaf = np.unique(node, return_inverse=True)
    return leaf.astype(np.int64)


@register_partitioner("tree", hidden=("features",))
def tree(labels: np.ndarray, num_partitions: int, rng: np.random.Generator, min_partition_size: int = 1,
         features: np.ndarray | None = None) -> list[np.ndarray]:
    """One decision-tree leaf per partition: exclusive, exhaustive feature-space regions (module docstring)."""
    min_size = _checks.positive_int(partition_key("min_partition_size"), min_partition_size)
    if features is None:
        raise DataError(f"{PARTITIONER_KEY}: 'tree' splits by features, and none were given",
                        "partition a dataset through the scenario (fedsim passes its training features)")
    flat = np.asarray(features, dtype=np.float64).reshape(len(labels), -1)
    if flat.shape[0] != len(labels):
        raise DataError(f"features have {flat.shape[0]} rows but labels {len(labels)}", "give one row per sample")
    seed = int(rng.integers(0, 2**31 - 1))
    leaf = tree_leaves(flat, labels, num_partitions, min_size, seed)
    found = int(leaf.max()) + 1 if leaf.size else 0
    if found < num_partitions:
        raise DataError(f"{NUM_PARTITIONS_KEY}: the decision tree of the 'tree' partitioner ends with {found} "
                        f"leaves (a node stops splitting when its labels agree or a side would hold fewer than "
                        f"{min_size} samples), fewer than the {num_partitions} clients",
                        f"use at most {found} clients, or lower {partition_key('min_partition_size')}")
    client_of_leaf = rng.permutation(num_partitions)
    return group_by_owner(client_of_leaf[leaf], num_partitions)
