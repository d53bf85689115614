"""Fast, checked conversion between Flower ``Array`` records and NumPy arrays.

``Array.numpy()`` parses the ``.npy`` header with ``ast.literal_eval`` on every call, which
dominated the cost of many small clients. Here the payload is viewed in place, after checking
that the record's declared dtype and shape agree with its ``.npy`` header and payload size (Flower
itself never checks this; a mismatch raises ``ValueError``).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord

_MAGIC = b"\x93NUMPY"


#: ``(declared dtype, declared shape, .npy header) -> (dtype, shape, count, payload bytes)`` of the headers found
#: consistent with their declaration: the check depends on nothing else, so each kind is checked once
_CONSISTENT: dict[tuple[str, tuple, bytes], tuple[np.dtype, tuple[int, ...], int, int]] = {}


def to_numpy(a: Array) -> np.ndarray:
    """Read-only NumPy view of an ``Array``; ``ValueError`` if its header lies about the payload."""
    data = a.data
    if a.stype != "numpy.ndarray" or data[:6] != _MAGIC:
        return _checked_slow(a)
    major = data[6]
    if major == 1:
        hlen, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(data[8:12], "little"), 12
    else:
        return _checked_slow(a)
    header = data[start:start + hlen]
    offset = start + hlen
    key = (a.dtype, tuple(a.shape), header)
    try:
        known = _CONSISTENT.get(key)
    except TypeError:  # a declared dtype or shape that is no str or tuple of ints
        return _checked_slow(a)
    if known is None:
        known = _consistent_header(a.dtype, key[1], header)
        if known is None:
            return _checked_slow(a)
        if len(_CONSISTENT) < 4096:
            _CONSISTENT[key] = known
    dtype, shape, count, nbytes = known
    if len(data) - offset != nbytes:
        return _checked_slow(a)
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _consistent_header(declared: str, declared_shape: tuple, header: bytes
                       ) -> tuple[np.dtype, tuple[int, ...], int, int] | None:
    """``(dtype, shape, count, payload bytes)`` when the ``.npy`` header states the declared dtype and shape of a
    C-ordered array of plain values, else ``None`` (left to :func:`_checked_slow`)."""
    try:
        dtype = np.dtype(declared)
        shape = tuple(int(s) for s in declared_shape)
    except (TypeError, ValueError):
        return None
    if (dtype.hasobject or b"'fortran_order': False" not in header
            or repr(dtype.str).encode() not in header or repr(shape).encode() not in header):
        return None
    count = math.prod(shape)
    return dtype, shape, count, count * dtype.itemsize


def _checked_slow(a: Array) -> np.ndarray:
    """Parse with NumPy, then check the declared dtype and shape and that no bytes trail the array."""
    import io

    try:
        declared = np.dtype(a.dtype)
        buf = io.BytesIO(a.data)
        version = np.lib.format.read_magic(buf)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        _, _, dtype = read_header(buf)
        offset = buf.tell()
        arr = a.numpy()
    except Exception as err:  # a corrupt record must never stop the server
        raise ValueError(f"Array record is not a readable .npy payload: {type(err).__name__}: {err}") from None
    if str(arr.dtype) != str(declared) or tuple(arr.shape) != tuple(a.shape):
        raise ValueError(f"Array header says {a.dtype}{tuple(a.shape)} but its payload is "
                         f"{arr.dtype}{tuple(arr.shape)}")
    if not dtype.hasobject and len(a.data) - offset != arr.nbytes:
        raise ValueError(f"Array payload has {len(a.data) - offset} bytes after its header, {arr.nbytes} expected")
    return arr


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in record.items()}


#: ``(dtype.str, shape) -> (.npy header, dtype name)``: both cost more to make than to look up
_HEADERS: dict[tuple[str, tuple[int, ...]], tuple[bytes, str]] = {}


def from_numpy(x: np.ndarray) -> Array:
    """``Array`` holding a ``.npy`` payload of ``x`` (same bytes as ``np.save``, header cached)."""
    x = np.asarray(x)
    if not x.flags.c_contiguous:
        x = x.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    key = (x.dtype.str, x.shape)
    made = _HEADERS.get(key)
    if made is None:
        import io

        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(x))
        made = _HEADERS.setdefault(key, (b"\x93NUMPY\x01\x00" + buf.getvalue()[8:], str(x.dtype)))
    header, dtype = made
    return _array(dtype, x.shape, header + x.tobytes())


def _array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """``Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)`` without the constructor's
    parsing of its arguments (most of the cost of a small array): the same attributes, which
    ``tests/fedsim/test_wire.py`` checks against Flower's constructor."""
    array = object.__new__(Array)
    array.__dict__.update(_is_dirty=True, dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)
    return array


def array_record(arrays: dict[str, Array]) -> ArrayRecord:
    """An ``ArrayRecord`` holding these ``Array`` objects themselves, in order (``ArrayRecord(dict)``
    rebuilds every ``Array`` through its constructor: a second copy of each array's header and fields)."""
    record = ArrayRecord()
    for k, a in arrays.items():
        record[k] = a
    return record


def state_to_arrays(model) -> ArrayRecord:
    """A torch module's full state dict (buffers included) as an ArrayRecord of copied arrays (the
    payload is a copy made by ``from_numpy``; later changes to the module never reach the record)."""
    return array_record({k: from_numpy(v.detach().cpu().numpy()) for k, v in model.state_dict().items()})
