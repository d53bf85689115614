"""Gradient coding: exhaustive straggler sets, typed failures, coded GD == full GD (spec section 4a)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedsim.errors import AggregationError, ConfigError
from fedsim.rng import numpy_rng
from fedsim.strategies.coded_math import (
    GradientCode,
    cyclic_repetition_code,
    decode,
    decoding_vector,
    encode,
    fractional_repetition_code,
    make_code,
)


def all_codes(max_n=12):
    for n in range(1, max_n + 1):
        for s in range(n):
            yield make_code(n, s, "cyclic", numpy_rng(n * 100 + s, "gc"))
            if n % (s + 1) == 0:
                yield make_code(n, s, "fractional")


def check_recovery(code: GradientCode, survivor_sets, rng):
    parts = rng.standard_normal((code.n, 3))
    coded = code.B @ parts
    truth = parts.sum(axis=0)
    for F in survivor_sets:
        F = list(F)
        a = code.decoding_vector(F)
        assert np.max(np.abs(a @ code.B[F] - 1.0)) < 1e-9, (code.n, code.s, code.scheme, F)
        np.testing.assert_allclose(code.decode(F, coded[F]), truth, rtol=1e-8, atol=1e-8)


def test_exact_recovery_every_straggler_set_small_n():
    rng = numpy_rng(0, "gc-test")
    for code in all_codes(12):
        n, s = code.n, code.s
        for k in range(s + 1):                  # every straggler set of size <= s
            check_recovery(code, itertools.combinations(range(n), n - k), rng)


@pytest.mark.parametrize("n,s", [(16, 3), (20, 4), (24, 2), (30, 5)])
@pytest.mark.parametrize("scheme", ["cyclic", "fractional"])
def test_recovery_sampled_sets_large_n(n, s, scheme):
    if scheme == "fractional" and n % (s + 1):
        pytest.skip("(s+1) must divide n")
    rng = numpy_rng(n, s, scheme)
    code = make_code(n, s, scheme, rng)
    sets = [np.sort(rng.choice(n, n - rng.integers(0, s + 1), replace=False)) for _ in range(150)]
    check_recovery(code, sets, rng)


def test_structure_rows_have_s_plus_1_nonzeros():
    for code in all_codes(10):
        assert np.all((code.B != 0).sum(axis=1) == code.s + 1)
        assert np.all((code.B != 0).sum(axis=0) == code.s + 1)       # every partition on s+1 workers
        assert code.load == pytest.approx((code.s + 1) / code.n)
    B = cyclic_repetition_code(7, 2, numpy_rng(1))
    for i in range(7):
        assert set(np.flatnonzero(B[i])) == {i, (i + 1) % 7, (i + 2) % 7}


def test_worked_example_n3_s1():
    B = np.array([[0.5, 1, 0], [0, 1, -1], [0.5, 0, 1]])
    np.testing.assert_allclose(decoding_vector(B, [0, 1]), [2, -1])
    np.testing.assert_allclose(decoding_vector(B, [0, 2]), [1, 1])
    np.testing.assert_allclose(decoding_vector(B, [1, 2]), [1, 2])


def test_more_than_s_stragglers_raise_never_wrong():
    rng = numpy_rng(3)
    code = make_code(8, 2, "cyclic", rng)
    for F in itertools.combinations(range(8), 8 - 3):
        with pytest.raises(AggregationError):
            code.decoding_vector(F)
    fr = make_code(6, 1, "fractional")               # groups {0,1} {2,3} {4,5}
    parts = rng.standard_normal((6, 2))
    coded = fr.B @ parts
    np.testing.assert_allclose(fr.decode([0, 3, 5], coded[[0, 3, 5]]), parts.sum(axis=0))   # 3 stragglers, ok
    with pytest.raises(AggregationError):
        fr.decode([0, 1, 2, 3], coded[[0, 1, 2, 3]])  # group {4,5} lost
    with pytest.raises(AggregationError):
        decoding_vector(code.B, [])


def test_encode_uses_only_own_partitions():
    code = make_code(5, 2, "cyclic", numpy_rng(4))
    parts = {j: np.full(3, float(j + 1)) for j in range(5)}
    for i in range(5):
        own = {j: parts[j] for j in code.partitions_of(i)}
        np.testing.assert_allclose(code.encode(i, own), code.B[i] @ np.stack([parts[j] for j in range(5)]))
    with pytest.raises(AggregationError):
        encode(code.B, 0, {0: parts[0]})
    coded = {i: code.encode(i, parts) for i in range(5)}
    np.testing.assert_allclose(decode(code.B, [4, 1, 2], coded), sum(parts.values()))


def test_config_errors():
    with pytest.raises(ConfigError):
        fractional_repetition_code(6, 2 + 1)
    with pytest.raises(ConfigError):
        fractional_repetition_code(5, 1)
    with pytest.raises(ConfigError):
        make_code(4, 4, "cyclic", numpy_rng(0))
    with pytest.raises(ConfigError):
        make_code(4, 1, "cyclic")
    with pytest.raises(ConfigError):
        make_code(4, 1, "mds")


@pytest.mark.parametrize("scheme,n,s", [("cyclic", 6, 2), ("fractional", 6, 2), ("cyclic", 9, 3)])
def test_coded_gd_equals_full_gd(scheme, n, s):
    """Least-squares regression: coded GD under random straggler sets of size <= s == full GD."""
    rng = numpy_rng(11, scheme, n, s)
    X = rng.standard_normal((180, 6))
    y = X @ rng.standard_normal(6) + 0.1 * rng.standard_normal(180)
    parts = list(zip(np.array_split(X, n), np.array_split(y, n)))
    code = make_code(n, s, scheme, rng)
    lr = 0.5 / len(y)

    def partial(w):
        return [Xj.T @ (Xj @ w - yj) for Xj, yj in parts]

    w_full = np.zeros(6)
    w_coded = np.zeros(6)
    for _ in range(200):
        w_full = w_full - lr * sum(partial(w_full))
        g = partial(w_coded)
        coded = {i: code.encode(i, {j: g[j] for j in code.partitions_of(i)}) for i in range(n)}
        stragglers = rng.choice(n, rng.integers(0, s + 1), replace=False)
        survivors = [i for i in range(n) if i not in stragglers]
        w_coded = w_coded - lr * code.decode(survivors, coded)
    np.testing.assert_allclose(w_coded, w_full, rtol=0, atol=1e-6)
    assert np.max(np.abs(w_coded - w_full)) < 1e-9
