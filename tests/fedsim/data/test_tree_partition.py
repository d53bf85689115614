"""The ``tree`` partitioner: leaves of a decision tree are exclusive, exhaustive feature-space regions, one per
client; seeded; every client non-empty or a typed error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.data.partitioners import PARTITIONERS, partition
from fedsim.data.tree_partition import tree_leaves
from fedsim.errors import ConfigError, DataError
from tests.fedsim.data.test_partitioners import check_partition

FAST = settings(max_examples=40, deadline=None)


@st.composite
def featured(draw):
    n = draw(st.integers(2, 200))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).round(draw(st.sampled_from([0, 1, 3])))  # rounding makes ties and duplicates
    classes = draw(st.integers(1, 5))
    y = ((x[:, 0] > 0) * 1 + (x[:, -1] > 0.5) * 2).astype(np.int64) % classes
    return x, y, seed


def _leaf_regions(x, y, p, min_leaf, seed):
    """Decision paths of the fitted tree, to check regions are disjoint boxes covering new points too."""
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier(max_leaf_nodes=p, min_samples_leaf=min_leaf, random_state=seed).fit(x, y)


@FAST
@given(featured(), st.data())
def test_tree_partition_is_exclusive_exhaustive_deterministic_and_never_empty(case, data):
    x, y, seed = case
    p = data.draw(st.integers(1, min(len(y), 12)))
    min_leaf = data.draw(st.integers(1, 5))
    try:
        parts = partition("tree", y, p, np.random.default_rng(seed), {"min_partition_size": min_leaf}, features=x)
    except DataError as err:
        assert "data.num_clients" in str(err)
        tree_seed = int(np.random.default_rng(seed).integers(0, 2**31 - 1))  # the partitioner's first draw
        assert tree_leaves(x, y, p, min_leaf, tree_seed).max() + 1 < p
        return
    check_partition(parts, len(y), p)  # exclusive and exhaustive
    assert all(len(part) >= min(min_leaf, len(y)) for part in parts) and all(len(part) for part in parts)
    again = partition("tree", y, p, np.random.default_rng(seed), {"min_partition_size": min_leaf}, features=x)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_clients_are_feature_space_regions():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(400, 2))
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64)
    parts = partition("tree", y, 4, np.random.default_rng(1), {}, features=x)
    # four quadrants: each client holds one quadrant, pure in its label
    quadrant_of = {tuple(np.unique(y[part]).tolist()) for part in parts}
    assert quadrant_of == {(0,), (1,), (2,), (3,)}
    # each region is a box: a point between two samples of a client (same quadrant) is not owned by another
    for part in parts:
        lo, hi = x[part].min(0), x[part].max(0)
        others = np.setdiff1d(np.arange(len(y)), part)
        inside = np.all((x[others] >= lo) & (x[others] <= hi), axis=1)
        assert not inside.any()


def test_seed_changes_the_client_ids_of_the_leaves_and_sklearn_tree_matches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    y = (x @ np.array([1.0, -1.0, 0.5]) > 0).astype(np.int64)
    runs = {tuple(len(p) for p in partition("tree", y, 6, np.random.default_rng(s), {}, features=x)) for s in range(6)}
    assert len(runs) >= 2
    leaves = _leaf_regions(x, y, 6, 1, 123).apply(x)
    parts = partition("tree", y, 6, np.random.default_rng(9), {}, features=x)
    assert sorted(map(len, parts)) == sorted(np.unique(leaves, return_counts=True)[1].tolist())


def test_refusals_name_the_key():
    x, y = np.zeros((10, 2)), np.zeros(10, dtype=np.int64)
    with pytest.raises(DataError, match="data.num_clients"):  # one label: the tree never splits
        partition("tree", y, 3, np.random.default_rng(0), {}, features=x)
    with pytest.raises(ConfigError, match="data.partition.min_partition_size"):
        partition("tree", y, 1, np.random.default_rng(0), {"min_partition_size": 0}, features=x)
    with pytest.raises(ConfigError, match="data.partition.features"):
        partition("tree", y, 1, np.random.default_rng(0), {"features": [1]}, features=x)
    with pytest.raises(DataError, match="features"):
        PARTITIONERS.get("tree")(y, 1, np.random.default_rng(0))


def test_tree_partitioner_in_a_scenario():
    from fedsim.data.federation import federation_of
    from tests.conftest import tiny

    fed = federation_of(tiny(['data.partitioner="tree"', "data.num_clients=4"]))
    sizes = fed.client_sizes()
    assert len(sizes) == 4 and sizes.min() > 0
    assert sizes.sum() == len(fed.dataset.y_train)
