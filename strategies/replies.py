"""Checks of a client reply's content, written once for every strategy.

A strategy's ``parse_reply`` uses :func:`expect_array` for every named array it reads and
:func:`expect_count` for every count it trusts; each raises
:class:`~fedsim.errors.ClientUpdateError` naming the client and the field (``record.array``), so the
reply is recorded as invalid and the round goes on without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.errors import ClientUpdateError
from fedsim.wire import to_numpy

#: the largest ``num-examples`` a reply may claim
MAX_NUM_EXAMPLES = 10**9


def expect_array(content: RecordDict, pid: int, record: str, array: str, *, dtype: Any | None = None,
                 kind: str | None = None, shape: tuple[int, ...] | None = None, finite: bool = True,
                 hint: str = "client and server must build the same model") -> np.ndarray:
    """The array ``record.array`` of a reply, checked: present, header consistent with its payload,
    exact ``dtype`` (or dtype ``kind``), ``shape``, and finite (floats)."""
    rec = content.get(record)  # not ``content.array_records``: Flower rebuilds that view on every access
    if not isinstance(rec, ArrayRecord):
        raise ClientUpdateError(pid, record, "missing from the reply",
                                f"the client task must return an ArrayRecord '{record}'")
    field = f"{record}.{array}"
    if array not in rec:
        raise ClientUpdateError(pid, field, "missing from the reply", f"the record '{record}' must hold '{array}'")
    try:
        a = to_numpy(rec[array])
    except ValueError as err:
        raise ClientUpdateError(pid, field, str(err), "the record is corrupt") from None
    if dtype is not None and a.dtype != np.dtype(dtype):
        raise ClientUpdateError(pid, field, f"dtype {a.dtype}, expected {np.dtype(dtype)}")
    if kind is not None and a.dtype.kind != kind:
        raise ClientUpdateError(pid, field, f"dtype {a.dtype}, expected kind '{kind}'")
    if shape is not None and a.shape != tuple(shape):
        raise ClientUpdateError(pid, field, f"shape {a.shape}, expected {tuple(shape)}", hint)
    if finite and a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ClientUpdateError(pid, field, "contains NaN or Inf",
                                "lower the learning rate or check the client's data")
    return a


def expect_count(metrics: dict[str, Any], pid: int, key: str = "num-examples", minimum: int = 1,
                 maximum: int = MAX_NUM_EXAMPLES) -> int:
    """An integer metric of a reply in ``minimum..maximum`` (a float holding an integer is accepted)."""
    n = metrics.get(key)
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool) or not minimum <= n <= maximum:
        raise ClientUpdateError(pid, f"metrics.{key}", f"must be an integer in {minimum}..{maximum}, got {n!r}",
                                "report the local training-set size")
    return n


def decode_sign_reply(content: RecordDict, pid: int, shapes: dict[str, tuple[int, ...]],
                      record: str = "arrays") -> RecordDict:
    """A reply with its 1-bit packed arrays (``fedsim.sign_codec``: the ``codec`` record) decoded back to
    dense float32 ``s·sgn(W)`` in ``record``, shapes taken from the global model (``shapes``); a reply
    without a ``codec`` record is returned as it is. A malformed packed reply raises
    :class:`ClientUpdateError` naming the client and the field."""
    from fedsim.sign_codec import CODEC_RECORD, KEYS_FIELD, SCALES_FIELD, unpack_signs
    from fedsim.wire import from_numpy

    codec = content.get(CODEC_RECORD)  # (``content.config_records`` is a view Flower rebuilds per access)
    if not isinstance(codec, ConfigRecord):
        return content
    keys, scales = codec.get(KEYS_FIELD), codec.get(SCALES_FIELD)
    hint = "send packed replies through fedsim.sign_codec.encode_arrays"
    if (not isinstance(keys, list) or not isinstance(scales, list) or len(keys) != len(scales)
            or len(set(keys)) != len(keys) or not all(isinstance(k, str) for k in keys)):
        raise ClientUpdateError(pid, f"{CODEC_RECORD}.{KEYS_FIELD}", "must list distinct keys, one scale each", hint)
    if record not in content.array_records:
        raise ClientUpdateError(pid, record, "missing from the reply", "the client task must return it")
    dense = dict(content.array_records[record].items())
    for k, s in zip(keys, scales):
        if k not in dense or k not in shapes:
            raise ClientUpdateError(pid, f"{CODEC_RECORD}.{KEYS_FIELD}", f"packs '{k}', which is not an array "
                                    "of both the reply and the global model", hint)
        bits = expect_array(content, pid, record, k, dtype=np.uint8)
        try:
            dense[k] = from_numpy(unpack_signs(bits, s, shapes[k]))
        except (ValueError, TypeError) as err:
            raise ClientUpdateError(pid, f"{record}.{k}", f"malformed packed sign array: {err}", hint) from None
    return RecordDict({n: (ArrayRecord(dense) if n == record else r) for n, r in content.items()
                       if n != CODEC_RECORD})
