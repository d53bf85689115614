"""Properties of every partitioner: disjoint, covering, seed-deterministic, parameters respected."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from fedsim.data import label_skew
from fedsim.data.label_skew import MAX_DIRICHLET_REDRAWS
from fedsim.data.partitioners import PARTITIONERS, partition
from fedsim.data.splits import group_by_owner, largest_remainder
from fedsim.errors import ConfigError, DataError, UnknownNameError

FAST = settings(max_examples=60, deadline=None)


@st.composite
def labelled(draw, min_size: int = 1, max_size: int = 300, max_classes: int = 12):
    """A label array (possibly class-imbalanced) and a seed."""
    size = draw(st.integers(min_size, max_size))
    num_classes = draw(st.integers(1, max_classes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(num_classes, draw(st.sampled_from([0.3, 1.0, 100.0]))))
    return rng.choice(num_classes, size=size, p=skew).astype(np.int64), seed


def partitioner_params(name: str) -> list[str]:
    """The parameters a scenario may give the partitioner (``natural_ids`` comes from the data)."""
    params = list(inspect.signature(PARTITIONERS.get(name)).parameters.values())[3:]
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("natural_ids", "features")]


def check_partition(parts: list[np.ndarray], size: int, num_partitions: int, covering: bool = True) -> None:
    assert len(parts) == num_partitions
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1
        assert np.all(np.diff(part) > 0), "sorted and without repeats"
        assert part.size == 0 or (part[0] >= 0 and part[-1] < size)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "partitions overlap"
    if covering:
        assert len(joined) == size, "partitions do not cover the data"


# A setting that succeeds on 200 samples of 10 balanced classes, for the generic tests.
TYPICAL = {
    "iid": {},
    "dirichlet": {"alpha": 0.5, "min_partition_size": 2},
    "pathological": {"num_classes_per_partition": 2},
    "shard": {"num_shards_per_partition": 2},
    "quantity": {"power": 1.0},
    "natural": {},
    "tree": {},
}
BALANCED = np.arange(200, dtype=np.int64) % 10
OWNERS = np.arange(200, dtype=np.int64) // 20
FEATURES = np.stack([BALANCED, np.arange(200) % 7], axis=1).astype(np.float32)  # for "tree"


def run(name: str, seed: int, labels=BALANCED, num_partitions: int = 5, **params) -> list[np.ndarray]:
    params = {**TYPICAL[name], **params}
    return partition(name, labels, num_partitions, np.random.default_rng(seed), params, natural_ids=OWNERS,
                     features=FEATURES[:len(labels)])


def test_every_registered_partitioner_is_tested():
    assert set(PARTITIONERS.names()) == set(TYPICAL)


@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_same_seed_same_partition_and_seeds_usually_differ(name):
    first = run(name, 7)
    check_partition(first, len(BALANCED), 5)
    assert all(np.array_equal(a, b) for a, b in zip(first, run(name, 7)))
    others = {tuple(tuple(p.tolist()) for p in run(name, seed)) for seed in range(5)}
    expected_distinct = 1 if name == "natural" else 2  # natural follows the data, not the seed
    assert len(others) >= expected_distinct


@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_unknown_parameter_names_the_key_and_the_allowed_ones(name):
    with pytest.raises(ConfigError) as info:
        run(name, 0, bogus=1)
    assert info.value.key == "data.partition.bogus"
    assert all(param in str(info.value) for param in partitioner_params(name))
    assert "natural_ids" not in str(info.value)


@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_more_partitions_than_samples_is_a_data_error(name):
    with pytest.raises(DataError, match="data.num_clients"):
        partition(name, BALANCED[:3], 4, np.random.default_rng(0), TYPICAL[name], natural_ids=OWNERS[:3])


def test_unknown_partitioner_and_bad_labels():
    with pytest.raises(UnknownNameError) as info:
        partition("diriclet", BALANCED, 2, np.random.default_rng(0))
    assert info.value.key == "data.partitioner" and "dirichlet" in str(info.value)
    with pytest.raises(DataError, match="non-negative integers"):
        partition("iid", BALANCED.astype(float), 2, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="data.num_clients"):
        partition("iid", BALANCED, 0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="data.partition.natural_ids"):
        partition("natural", BALANCED, 2, np.random.default_rng(0), {"natural_ids": [0]})


@FAST
@given(labelled(), st.data())
def test_iid_is_covering_and_balanced(case, data):
    labels, seed = case
    num_partitions = data.draw(st.integers(1, len(labels)))
    parts = PARTITIONERS.get("iid")(labels, num_partitions, np.random.default_rng(seed))
    check_partition(parts, len(labels), num_partitions)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


alphas = st.one_of(st.floats(0.01, 100.0), st.lists(st.floats(0.05, 10.0), min_size=12, max_size=14))


@FAST
@given(labelled(), st.data(), alphas, st.integers(0, 15), st.booleans())
def test_dirichlet_respects_min_size_or_raises_a_typed_error(case, data, alpha, min_size, balancing):
    labels, seed = case
    num_partitions = data.draw(st.integers(1, min(len(labels), 30)))
    try:
        parts = PARTITIONERS.get("dirichlet")(labels, num_partitions, np.random.default_rng(seed), alpha=alpha,
                                              min_partition_size=min_size, self_balancing=balancing)
    except DataError as err:
        event("typed error")
        assert "data.partition.min_partition_size" in str(err) and err.hint
        return
    check_partition(parts, len(labels), num_partitions)
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_gives_up_after_a_bounded_number_of_draws(monkeypatch):
    calls = []
    original = label_skew._dirichlet_draw
    monkeypatch.setattr(label_skew, "_dirichlet_draw", lambda *a: calls.append(1) or original(*a))
    labels = np.arange(500) % 10
    with pytest.raises(DataError) as info:
        PARTITIONERS.get("dirichlet")(labels, 45, np.random.default_rng(0), alpha=0.001, min_partition_size=10)
    assert len(calls) == 1 + MAX_DIRICHLET_REDRAWS
    assert "data.partition.alpha" in info.value.hint and "min_partition_size" in str(info.value)


def test_dirichlet_impossible_and_malformed_settings():
    dirichlet = PARTITIONERS.get("dirichlet")
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="data.partition.min_partition_size") as info:
        dirichlet(BALANCED, 30, rng, alpha=1.0, min_partition_size=10)  # 300 > 200 samples
    assert "at most 6" in info.value.hint
    check_partition(dirichlet(BALANCED, 3, rng), len(BALANCED), 3)  # alpha defaults to 0.5
    with pytest.raises(ConfigError, match="data.partition.alpha"):
        dirichlet(BALANCED, 3, rng, alpha=0.0)
    with pytest.raises(ConfigError, match="per class"):
        dirichlet(BALANCED, 3, rng, alpha=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="data.partition.self_balancing"):
        dirichlet(BALANCED, 3, rng, alpha=1.0, self_balancing="yes")


def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha():
    labels = np.arange(2000) % 10

    def mean_classes(alpha):
        parts = PARTITIONERS.get("dirichlet")(labels, 10, np.random.default_rng(1), alpha=alpha,
                                              min_partition_size=0)
        return np.mean([np.sum(np.bincount(labels[p], minlength=10) > 0.05 * len(p)) for p in parts])

    assert mean_classes(0.05) < 4 < 9 < mean_classes(100.0)


@FAST
@given(labelled(), st.data(), st.integers(1, 6), st.sampled_from(["random", "deterministic", "first-deterministic"]))
def test_pathological_gives_exactly_k_classes_or_raises(case, data, per_partition, mode):
    labels, seed = case
    num_partitions = data.draw(st.integers(1, min(len(labels), 25)))
    try:
        parts = PARTITIONERS.get("pathological")(labels, num_partitions, np.random.default_rng(seed),
                                                 num_classes_per_partition=per_partition, class_assignment_mode=mode)
    except DataError as err:
        event("typed error")
        assert "data.partition." in str(err) and err.hint
        return
    check_partition(parts, len(labels), num_partitions)
    for part in parts:
        assert len(np.unique(labels[part])) == per_partition


def test_pathological_modes_and_impossible_requests():
    pathological = PARTITIONERS.get("pathological")
    rng = np.random.default_rng(0)
    parts = pathological(BALANCED, 10, rng, num_classes_per_partition=3, class_assignment_mode="deterministic")
    for i, part in enumerate(parts):
        assert set(BALANCED[part]) == {i % 10, (i + 1) % 10, (i + 2) % 10}
    parts = pathological(BALANCED, 4, rng, num_classes_per_partition=3, class_assignment_mode="first-deterministic")
    assert all(i in BALANCED[part] for i, part in enumerate(parts))
    with pytest.raises(DataError, match="data.partition.num_classes_per_partition"):
        pathological(BALANCED, 5, rng, num_classes_per_partition=11)
    with pytest.raises(DataError, match="cannot hold all 10 classes"):
        pathological(BALANCED, 3, rng, num_classes_per_partition=3)
    with pytest.raises(DataError, match="class_assignment_mode"):
        pathological(BALANCED, 4, rng, num_classes_per_partition=3, class_assignment_mode="deterministic")
    with pytest.raises(ConfigError, match="first-deterministic"):
        pathological(BALANCED, 4, rng, num_classes_per_partition=3, class_assignment_mode="fixed")


@FAST
@given(labelled(max_size=400), st.data(), st.one_of(st.none(), st.integers(1, 5)),
       st.one_of(st.none(), st.integers(1, 60)), st.booleans())
def test_shard_sizes_coverage_and_feasibility(case, data, per_partition, shard_size, keep):
    labels, seed = case
    assume(per_partition is not None or shard_size is not None)
    num_partitions = data.draw(st.integers(1, min(len(labels), 20)))
    size = shard_size or len(labels) // (num_partitions * per_partition)
    shards = per_partition or (len(labels) // (size * num_partitions) if size else 0)
    feasible = size > 0 and shards > 0 and num_partitions * shards * size <= len(labels)
    try:
        parts = PARTITIONERS.get("shard")(labels, num_partitions, np.random.default_rng(seed),
                                          num_shards_per_partition=per_partition, shard_size=shard_size,
                                          keep_incomplete_shard=keep)
    except DataError as err:
        event("typed error")
        assert not feasible and "data.partition." in str(err)
        return
    assert feasible
    check_partition(parts, len(labels), num_partitions, covering=keep)
    if not keep:
        assert all(len(p) == shards * size for p in parts)
    else:
        assert all(len(p) >= shards * size for p in parts)


def test_shard_fedavg_style_partitions_have_at_most_their_shards_classes():
    labels = np.repeat(np.arange(10), 30)  # a shard of 30 is exactly one class
    parts = PARTITIONERS.get("shard")(labels, 5, np.random.default_rng(3), num_shards_per_partition=2, shard_size=30)
    check_partition(parts, len(labels), 5)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    with pytest.raises(ConfigError, match="data.partition.num_shards_per_partition"):
        PARTITIONERS.get("shard")(labels, 5, np.random.default_rng(3))
    with pytest.raises(DataError, match="data.partition.shard_size"):
        PARTITIONERS.get("shard")(labels, 5, np.random.default_rng(3), num_shards_per_partition=2, shard_size=31)


@FAST
@given(labelled(), st.data(), st.floats(0.0, 3.0), st.integers(0, 5))
def test_quantity_sizes_follow_the_power_law(case, data, power, min_size):
    labels, seed = case
    num_partitions = data.draw(st.integers(1, min(len(labels), 40)))
    try:
        parts = PARTITIONERS.get("quantity")(labels, num_partitions, np.random.default_rng(seed),
                                             power=power, min_partition_size=min_size)
    except DataError as err:
        assert num_partitions * min_size > len(labels) and "data.partition.min_partition_size" in str(err)
        return
    check_partition(parts, len(labels), num_partitions)
    sizes = np.sort([len(p) for p in parts])[::-1]
    weights = np.arange(1, num_partitions + 1) ** -power
    expected = min_size + (len(labels) - num_partitions * min_size) * weights / weights.sum()
    assert np.all(np.abs(sizes - expected) < 1.0 + 1e-9)


@FAST
@given(labelled(), st.data())
def test_natural_keeps_each_owner_whole(case, data):
    labels, seed = case
    rng = np.random.default_rng(seed)
    owners = rng.integers(0, data.draw(st.integers(1, 20)), size=len(labels)) * 3 + 5  # sparse, unsorted ids
    num_owners = len(np.unique(owners))
    num_partitions = data.draw(st.integers(1, num_owners))
    parts = PARTITIONERS.get("natural")(labels, num_partitions, rng, natural_ids=owners)
    check_partition(parts, len(labels), num_partitions)
    owner_sets = [set(owners[p]) for p in parts]
    assert sum(len(s) for s in owner_sets) == num_owners, "an owner was split"
    if num_partitions == num_owners:
        assert all(len(s) == 1 for s in owner_sets)


def test_natural_needs_ids_and_enough_owners():
    natural = PARTITIONERS.get("natural")
    with pytest.raises(DataError, match="data.partitioner"):
        natural(BALANCED, 2, np.random.default_rng(0))
    with pytest.raises(DataError, match="data.num_clients") as info:
        natural(BALANCED, 11, np.random.default_rng(0), natural_ids=OWNERS)
    assert "at most 10" in info.value.hint


def test_required_parameters_are_reported_by_key():
    from fedsim.data._checks import with_checked_keywords

    @with_checked_keywords("data.partition", skip=3)
    def needs_k(labels, num_partitions, rng, k, spread=1.0):
        return k

    with pytest.raises(ConfigError) as info:
        needs_k(BALANCED, 2, None)
    assert info.value.key == "data.partition.k"
    assert needs_k(BALANCED, 2, None, k=3) == 3


def test_min_partition_size_error_is_the_same_for_quantity_and_dirichlet():
    messages = []
    for name in ("quantity", "dirichlet"):
        with pytest.raises(DataError) as info:
            PARTITIONERS.get(name)(BALANCED, 5, np.random.default_rng(0), min_partition_size=41)
        messages.append((str(info.value), info.value.hint))
    assert messages[0] == messages[1]
    assert "data.partition.min_partition_size: 5 partitions of at least 41 samples need 205" in messages[0][0]
    assert "at most 40" in messages[0][1] and "data.num_clients" in messages[0][1]


def _hamilton_reference(total, weights):
    """Largest remainder in exact fractions; ``None`` when two remainders tie at the cut (float may break it)."""
    from fractions import Fraction

    shares = [Fraction(total * w, sum(weights)) for w in weights]
    counts = [int(s) for s in shares]
    remainder = [s - c for s, c in zip(shares, counts)]
    order = sorted(range(len(shares)), key=lambda i: (-remainder[i], i))
    extra = total - sum(counts)
    if 0 < extra < len(order) and remainder[order[extra - 1]] == remainder[order[extra]]:
        return None
    for i in order[:extra]:
        counts[i] += 1
    return counts


@FAST
@given(st.integers(0, 10_000), st.lists(st.integers(0, 50), min_size=1, max_size=40).filter(any))
def test_largest_remainder_sums_to_total_and_matches_exact_hamilton(total, weights):
    counts = largest_remainder(total, weights)
    assert counts.dtype == np.int64 and counts.shape == (len(weights),)
    assert int(counts.sum()) == total and np.all(counts >= 0)
    quota = total * np.asarray(weights, dtype=float) / sum(weights)
    assert np.all(np.abs(counts - quota) < 1.0 + 1e-9)
    reference = _hamilton_reference(total, weights)
    if reference is not None:  # distinct exact remainders differ by >= 1/sum(weights), far above float error
        assert counts.tolist() == reference


def test_largest_remainder_examples_and_the_callers_normaliser():
    assert largest_remainder(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert largest_remainder(7, np.array([0.5, 0.25, 0.25])).tolist() == [3, 2, 2]
    assert largest_remainder(0, [3, 1]).tolist() == [0, 0]
    fractions = [0.1] * 9 + [0.05] * 2
    assert largest_remainder(13, fractions, weight_sum=sum(fractions)).sum() == 13
    with pytest.raises(ValueError, match="positive sum"):
        largest_remainder(3, [0.0, 0.0])


def test_group_by_owner_drops_unowned_and_keeps_empty_groups():
    owner = np.array([2, -1, 0, 2, 0, -1, 2])
    groups = group_by_owner(owner, 4)
    assert [g.tolist() for g in groups] == [[2, 4], [], [0, 3, 6], []]
    assert all(g.dtype == np.int64 for g in groups)
