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
    try:
        dtype = np.dtype(a.dtype)
    except TypeError:
        return _checked_slow(a)
    shape = tuple(int(s) for s in a.shape)
    count = math.prod(shape)
    if (dtype.hasobject or b"'fortran_order': False" not in header
            or repr(dtype.str).encode() not in header or repr(shape).encode() not in header
            or len(data) - offset != count * dtype.itemsize):
        return _checked_slow(a)
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


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


_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def from_numpy(x: np.ndarray) -> Array:
    """``Array`` holding a ``.npy`` payload of ``x`` (same bytes as ``np.save``, header cached)."""
    x = np.asarray(x)
    if not x.flags.c_contiguous:
        x = x.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    key = (x.dtype.str, x.shape)
    header = _HEADERS.get(key)
    if header is None:
        import io

        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(x))
        header = _HEADERS.setdefault(key, b"\x93NUMPY\x01\x00" + buf.getvalue()[8:])
    return Array(dtype=str(x.dtype), shape=tuple(x.shape), stype="numpy.ndarray", data=header + x.tobytes())


def state_to_arrays(model) -> ArrayRecord:
    """A torch module's full state dict (buffers included) as an ArrayRecord of copied arrays."""
    return ArrayRecord({k: from_numpy(v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items()})
