"""Index arithmetic for splits: seeded, stratified splits that never fail on tiny groups (unlike
scikit-learn's), largest-remainder sizes and grouping samples by owner."""

from __future__ import annotations

import numpy as np


def stratified_take(groups: np.ndarray, count: int, rng: np.random.Generator,
                    keep_per_group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` indices so that every group is represented in proportion.

    Each group ``g`` of size ``n_g`` gives ``floor(count * n_g / N)`` indices; the rest go to the
    groups with the largest fractional remainders (random tie-break). A group keeps at least
    ``keep_per_group`` members when it can, so a class (or a user) is not emptied by the split;
    if ``count`` forces it, that preference is relaxed.

    Parameters
    ----------
    groups
        Group id (label or user id) per sample, shape ``(N,)``.
    count
        Number of indices to take, ``0 <= count <= N``.
    rng
        Source of randomness (which members of a group are taken).
    keep_per_group
        Members each group keeps where possible.

    Returns
    -------
    taken, rest
        Sorted ``int64`` index arrays; disjoint, together covering ``range(N)``.
    """
    groups = np.asarray(groups)
    total = len(groups)
    if not 0 <= count <= total:
        raise ValueError(f"count must lie in [0, {total}], got {count}")
    ids, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    quota = count * sizes / max(total, 1)
    soft_room = np.maximum(sizes - keep_per_group, 0)
    take = np.minimum(np.floor(quota).astype(np.int64), soft_room)
    order = np.lexsort((rng.random(len(ids)), -(quota - take)))
    missing = count - int(take.sum())
    for g in order:  # largest remainders first: one extra each
        if missing > 0 and take[g] < soft_room[g]:
            take[g] += 1
            missing -= 1
    for room in (soft_room, sizes):  # only when caps bind: fill what room is left
        for g in order:
            extra = min(missing, int(room[g] - take[g]))
            take[g] += extra
            missing -= extra
    members_by_group = np.split(np.argsort(inverse, kind="stable"), np.cumsum(sizes)[:-1])
    taken = [rng.choice(members, size=int(k), replace=False) for members, k in zip(members_by_group, take)]
    taken_idx = np.sort(np.concatenate(taken).astype(np.int64)) if taken else np.zeros(0, np.int64)
    mask = np.ones(total, dtype=bool)
    mask[taken_idx] = False
    return taken_idx, np.flatnonzero(mask).astype(np.int64)


def stratified_fraction(groups: np.ndarray, fraction: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split into ``(train, test)`` with about ``fraction`` of every group in test.

    Every group keeps at least one training member where possible, so a per-user split does not
    leave a user without training data.
    """
    count = int(round(fraction * len(groups)))
    test, train = stratified_take(groups, count, rng)
    return train, test


def largest_remainder(total: int, weights, *, weight_sum: float | None = None) -> np.ndarray:
    """Non-negative integers proportional to ``weights`` that sum to ``total`` (Hamilton's method).

    Entry ``i`` gets ``floor(total * w_i / W)``; the units left over go, one each, to the entries
    with the largest fractional remainders (ties: lowest index first).

    Parameters
    ----------
    total
        The integer to share out, ``>= 0``.
    weights
        Non-negative weights (any sequence of numbers), not all zero.
    weight_sum
        The normaliser ``W``; default ``np.sum(weights)``. A caller that has always divided by
        another sum of the same weights (e.g. Python's left-to-right ``sum``) passes it here to
        keep its numbers bit-identical.

    Returns
    -------
    np.ndarray
        ``int64`` counts, one per weight, summing to ``total``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weight_sum is None:
        weight_sum = weights.sum()
    if not weight_sum > 0:
        raise ValueError(f"weights must have a positive sum, got {weight_sum}")
    share = total * weights / weight_sum
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[: total - int(counts.sum())]] += 1
    return counts


def group_by_owner(owner: np.ndarray, num_groups: int) -> list[np.ndarray]:
    """Index arrays ``[where(owner == g) for g in range(num_groups)]``; ``owner == -1`` is dropped.

    Each array is sorted and ``int64``; ``owner`` holds a group id in ``[0, num_groups)`` (or
    ``-1``) per sample.
    """
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner[owner >= 0], minlength=num_groups)
    start = int(np.sum(owner < 0))
    return [part.astype(np.int64) for part in np.split(order[start:], np.cumsum(counts)[:-1])]
