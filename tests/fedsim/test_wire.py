import io

import numpy as np
import pytest
from flwr.app import Array
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fedsim.wire import from_numpy, to_numpy

dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8])


@settings(max_examples=80, deadline=None)
@given(dtypes.flatmap(lambda d: arrays(d, array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))))
def test_round_trip_matches_numpy_save(x):
    a = from_numpy(x)
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    assert a.data == buf.getvalue()
    y = to_numpy(a)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(a.numpy(), x)


def test_header_that_lies_is_rejected():
    real = from_numpy(np.ones(4, dtype=np.float64))
    liar = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=real.data)
    with pytest.raises(ValueError, match="header"):
        to_numpy(liar)
    short = Array(dtype="float64", shape=(1,), stype="numpy.ndarray", data=real.data)
    with pytest.raises(ValueError):
        to_numpy(short)


def test_non_contiguous_input():
    x = np.arange(6.0).reshape(2, 3).T
    np.testing.assert_array_equal(to_numpy(from_numpy(x)), x)


def test_trailing_bytes_after_the_array_are_refused():
    import pytest
    from flwr.app import Array

    from fedsim.wire import from_numpy, to_numpy

    good = from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    padded = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data + b"\x00" * 4)
    with pytest.raises(ValueError, match="bytes after its header"):
        to_numpy(padded)


def test_a_checked_header_is_remembered_but_never_vouches_for_another_declaration_or_payload():
    real = from_numpy(np.ones((2, 3), dtype=np.float64))
    np.testing.assert_array_equal(to_numpy(real), np.ones((2, 3)))  # its header is now known good
    for dtype, shape, data in [("float32", (2, 3), real.data), ("float64", (3, 2), real.data),
                               ("float64", (2, 3), real.data[:-8]), ("float64", (2, 3), real.data + b"\0" * 8)]:
        with pytest.raises(ValueError):
            to_numpy(Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data))


@pytest.mark.parametrize("x", [np.arange(6, dtype=np.float32).reshape(2, 3), np.float64(2.5), np.zeros(0, np.int64)])
def test_from_numpy_makes_the_array_flowers_constructor_makes(x):
    """``from_numpy`` skips ``Array.__init__``'s argument parsing; the object must be the same one."""
    made = from_numpy(x)
    flower = Array(dtype=made.dtype, shape=made.shape, stype="numpy.ndarray", data=made.data)
    assert made.__dict__ == flower.__dict__ and made == flower
    assert made.object_id == flower.object_id
    np.testing.assert_array_equal(made.numpy(), x)


def test_array_record_holds_the_arrays_given_in_order():
    from flwr.app import ArrayRecord

    from fedsim.wire import array_record

    arrays = {k: from_numpy(np.full(3, i, np.float32)) for i, k in enumerate(["b", "a", "c"])}
    record = array_record(arrays)
    assert list(record) == ["b", "a", "c"] and all(record[k] is arrays[k] for k in arrays)
    assert record == ArrayRecord(arrays) and record.object_id == ArrayRecord(arrays).object_id
