"""Gradient coding: exhaustive straggler sets, typed failures, coded GD == full GD (spec section 4a);
conditioning: decoding amplification, the best-conditioned cyclic code, the message dtype (issue 12)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.errors import AggregationError, ConfigError
from fedsim.rng import numpy_rng
from fedsim.strategies.coded_math import (
    MAX_AMPLIFICATION,
    GradientCode,
    code_amplification,
    cyclic_repetition_code,
    decode,
    decoding_amplification,
    decoding_vector,
    encode,
    fractional_repetition_code,
    make_code,
    message_dtype,
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


# ------------------------------------------------------------------------------------ conditioning
U32 = 2.0 ** -24          # float32 unit round-off


def cancelling_gradients(rng: np.random.Generator, n: int, d: int = 64) -> np.ndarray:
    """float32 partial gradients that mostly cancel in the sum (label skew): ``sum_j |g_j| >> |sum_j g_j|``."""
    common = rng.standard_normal(d)
    signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    return (signs[:, None] * common + 1e-2 * rng.standard_normal((n, d))).astype(np.float32)


def decode_in(code: GradientCode, survivors, grads: np.ndarray, dtype) -> np.ndarray:
    messages = {i: code.encode(i, grads).astype(dtype) for i in survivors}     # what a worker sends
    return code.decode(survivors, messages)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["cyclic", "fractional"]), st.integers(2, 12), st.integers(0, 4), st.integers(0, 2**16),
       st.data())
def test_messages_in_message_dtype_decode_to_float32_round_off_of_the_plain_sum(scheme, n, s, seed, data):
    s = min(s, n - 1)
    if scheme == "fractional":
        n = max(n - n % (s + 1), s + 1)
    code = make_code(n, s, scheme, numpy_rng(seed, "gradient-code"))
    dtype = message_dtype(code.B)
    assert (dtype == np.float32) == (s == 0)                  # float32 carries only single pieces losslessly
    rng = np.random.default_rng(seed)
    grads = cancelling_gradients(rng, n)
    stragglers = data.draw(st.lists(st.integers(0, n - 1), max_size=s, unique=True))
    survivors = [i for i in range(n) if i not in stragglers]
    plain = grads.astype(np.float64).sum(axis=0)
    bound = U32 * np.abs(grads.astype(np.float64)).sum(axis=0)
    err = np.abs(decode_in(code, survivors, grads, dtype) - plain)
    assert np.all(err <= 1.01 * bound), float(np.max(err / bound))
    assert code.amplification_of(survivors) <= code.amplification * (1 + 1e-9)


def test_float32_messages_of_a_cyclic_code_are_not_exact():
    """The negative control of the test above: the reference's single random draw for n = 10, s = 2
    (seed 0) decodes with amplification 6.8e4, and float32 messages miss the plain sum by far more
    than float32 round-off; float64 messages do not."""
    code = make_code(10, 2, "cyclic", numpy_rng(0, "gradient-code"), candidates=1)
    assert code.amplification > 1e4 and message_dtype(code.B) == np.float64
    grads = cancelling_gradients(np.random.default_rng(0), 10)
    plain = grads.astype(np.float64).sum(axis=0)
    bound = U32 * np.abs(grads.astype(np.float64)).sum(axis=0)
    worst32 = worst64 = 0.0
    for F in itertools.combinations(range(10), 8):
        worst32 = max(worst32, float(np.max(np.abs(decode_in(code, F, grads, np.float32) - plain) / bound)))
        worst64 = max(worst64, float(np.max(np.abs(decode_in(code, F, grads, np.float64) - plain) / bound)))
    assert worst32 > 100 and worst64 < 1e-3


def test_code_amplification_is_the_worst_survivor_set_and_the_best_candidate_is_kept():
    for n, s in [(7, 2), (10, 2), (9, 3)]:
        one = make_code(n, s, "cyclic", numpy_rng(n, s, "gradient-code"), candidates=1)
        best = make_code(n, s, "cyclic", numpy_rng(n, s, "gradient-code"), candidates=8)
        each = [decoding_amplification(one.B, F, decoding_vector(one.B, F, max_amplification=np.inf))
                for F in itertools.combinations(range(n), n - s)]
        worst, exhaustive = code_amplification(one.B, s)
        assert exhaustive and worst == pytest.approx(max(each), rel=1e-6) and one.amplification == worst
        assert best.amplification <= one.amplification          # the first candidate is the same draw
    sampled, exhaustive = code_amplification(make_code(30, 5, "cyclic", numpy_rng(1)).B, 5, numpy_rng(2), 50)
    assert not exhaustive and 1.0 < sampled < MAX_AMPLIFICATION
    fr, uncoded = make_code(6, 2, "fractional"), make_code(6, 0, "cyclic", numpy_rng(0))
    assert fr.amplification == pytest.approx(1.0) and uncoded.amplification == pytest.approx(1.0)
    assert message_dtype(uncoded.B) == np.float32 and message_dtype(fr.B) == np.float64   # a sum rounds once
    assert message_dtype(uncoded.B, "float64") == np.float64


def test_ill_conditioned_survivor_sets_are_refused():
    code = make_code(10, 2, "cyclic", numpy_rng(0, "gradient-code"), candidates=1)
    F = max(itertools.combinations(range(10), 8), key=lambda F: code.amplification_of(list(F)))
    amp = code.amplification_of(list(F))
    with pytest.raises(AggregationError, match="amplification"):
        decoding_vector(code.B, F, max_amplification=amp / 2)
    np.testing.assert_allclose(decoding_vector(code.B, F, max_amplification=amp * 2) @ code.B[list(F)], 1.0,
                               atol=1e-9)
