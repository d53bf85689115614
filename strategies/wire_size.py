"""Serialised size of a Flower 1.39 message from lengths alone: no ``deflate()``, no SHA-256.

``fedsim.strategies.wire_bytes.message_bytes_reference`` sums ``len(obj.deflate())`` over a message's
inflatable object tree, one entry per distinct object id. Every deflated object is a header
``"<class> <child ids joined by ','> <body length>\\x00"`` and a body, so its length follows from
the body's length and the number of distinct children (an object id is always 64 hex digits):

* ``Message``: a protobuf ``Message`` holding the metadata (``message_id`` blanked) and the error;
  its size follows from field lengths (varints, doubles, UTF-8 strings), computed here field by
  field (:func:`_metadata_len`); one child, the ``RecordDict``, unless the message is an error;
* ``RecordDict`` / ``ArrayRecord``: ``json.dumps({name: child id})``, so only the names' JSON
  lengths matter; ``Array``: ``json.dumps`` of dtype, shape, stype and the chunk index list;
* ``ArrayChunk``: the raw slice of ``Array.data`` (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` bytes each);
* ``ConfigRecord`` / ``MetricRecord``: protobuf items ``(key, value)``, sized per value type.

Objects with the same id are counted once per message. Ids are content hashes, and every deflated
form here is a function of its content, so "same id" is decided by comparing content instead of
hashing it: arrays and chunks by their bytes (``memcmp``, only between candidates of equal length
and a matching tail), array records by their names and arrays, config and metric records of equal
size by their deflated bytes (rare: two equal-size records of one kind in one message). Anything
this module does not recognise exactly (a subclass, a value type the fast rules do not cover, a
value Flower would refuse) raises :class:`Unsupported`; the caller then measures the message with
the reference. Equality with the reference is a Hypothesis property in
``tests/strategies/test_wire_bytes.py``.
"""

from __future__ import annotations

import json
import math

import flwr.app.message.array as _array_module
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

__all__ = ["Unsupported", "fast_message_bytes"]

_INT64_MAX = (1 << 63) - 1
_UINT64_LIMIT = 1 << 64
_TAIL = 32  # bytes of a chunk's end used to bucket candidates before a full comparison


class Unsupported(Exception):
    """The message holds something the fast rules do not cover: measure it with the reference."""


def _varint(v: int) -> int:
    return 1 if v < 128 else (v.bit_length() + 6) // 7


def _zigzag(v: int) -> int:
    return v << 1 if v >= 0 else (-v << 1) - 1


def _field(n: int) -> int:
    """A length-delimited field of ``n`` bytes with a one-byte tag."""
    return 1 + _varint(n) + n


def _utf8(s: object) -> int:
    if type(s) is not str:
        raise Unsupported(f"string field of type {type(s).__name__}")
    return len(s) if s.isascii() else len(s.encode("utf-8"))


def _object(name_len: int, children: int, body: int) -> int:
    """Deflated size of an object: ``name``, ``children`` distinct ids, a ``body``-byte body."""
    return name_len + 3 + (65 * children - 1 if children else 0) + len(str(body)) + body


# ---- Message ---------------------------------------------------------------------------------------

def _uint64(v: object, present: bool = False) -> int:
    """Bytes of a uint64 field (tag included) holding ``v``; proto3 omits 0 unless ``present``."""
    if type(v) is not int or not 0 <= v < _UINT64_LIMIT:
        raise Unsupported(f"uint64 field {v!r}")
    return (2 if v < 128 else 1 + (v.bit_length() + 6) // 7) if v or present else 0


def _double(v: object) -> int:
    """Bytes of a double field holding ``v``: proto3 writes any bit pattern but +0.0 (so -0.0 and nan)."""
    if type(v) is not float and type(v) is not int:
        raise Unsupported(f"double field {v!r}")
    return 9 if v or math.copysign(1.0, v) < 0.0 else 0  # nan is true


def _string(s: object) -> int:
    """Bytes of a string field holding ``s``, omitted when empty."""
    n = _utf8(s)
    return (2 if n < 128 else 1 + _varint(n)) + n if n else 0


def _metadata_len(md: dict) -> int:
    """Length of ``metadata_to_proto(metadata)`` with ``message_id = ""`` (fields 1-11)."""
    n = _uint64(md["_run_id"]) + _uint64(md["_src_node_id"]) + _uint64(md["_dst_node_id"])
    n += _string(md["_reply_to_message_id"]) + _string(md["_group_id"]) + _string(md["_message_type"])
    n += _double(md["_ttl"]) + _double(md["_created_at"])
    for task in (md["_src_task_id"], md["_dst_task_id"]):  # optional: written when set, even 0
        if task is not None:
            n += _uint64(task, True)
    return n


def _error_len(error: object) -> int:
    d = error.__dict__
    code, reason = d["_code"], d["_reason"] or ""
    if type(code) is not int or not -_INT64_MAX - 1 <= code <= _INT64_MAX:
        raise Unsupported(f"error code {code!r}")
    return (1 + _varint(_zigzag(code)) if code else 0) + ((_field(_utf8(reason))) if reason else 0)


def _message_own(msg: Message, has_content: bool) -> int:
    d = msg.__dict__
    body = _field(_metadata_len(d["_metadata"].__dict__))
    if d["_error"] is not None:
        body += _field(_error_len(d["_error"]))
    return _object(7, 1 if has_content else 0, body)


# ---- ConfigRecord / MetricRecord -----------------------------------------------------------------

def _int_scalar(v: int) -> int:
    if v > _INT64_MAX:  # Flower sends it as uint64
        if v >= _UINT64_LIMIT:
            raise Unsupported(f"integer {v} beyond uint64")
        return 1 + _varint(v)
    if v < -_INT64_MAX - 1:
        raise Unsupported(f"integer {v} beyond int64")
    return 1 + _varint(_zigzag(v))


def _int_list(values: list) -> int:
    """Packed payload of a sint64 or uint64 list (Flower picks uint64 when any value needs it)."""
    if any(v > _INT64_MAX for v in values):
        if any(v < 0 or v >= _UINT64_LIMIT for v in values):
            raise Unsupported("integer list mixing uint64 and negative values")
        return sum(_varint(v) for v in values)
    if any(v < -_INT64_MAX - 1 for v in values):
        raise Unsupported("integer beyond int64 in a list")
    return sum(_varint(_zigzag(v)) for v in values)


def _packed(payload: int) -> int:
    return _field(payload) if payload else 0  # an empty repeated field is not written


def _list_value(values: list, config: bool) -> int:
    """Length of a ``*RecordValue`` holding a list: 2-byte tag (fields 21-26) and the list message."""
    kinds = set(map(type, values))
    if config and kinds <= {bool}:  # the empty list is a bool list in a ConfigRecord...
        body = _packed(len(values))
    elif not config and not kinds or kinds == {float}:  # ...and a double list in a MetricRecord
        body = _packed(8 * len(values))
    elif kinds <= ({int, bool} if config else {int}):
        body = _packed(_int_list(values))
    elif config and kinds == {str}:
        body = sum(_field(_utf8(s)) for s in values)
    elif config and kinds == {bytes}:
        body = sum(_field(len(b)) for b in values)
    else:
        raise Unsupported(f"list of {sorted(k.__name__ for k in kinds)}")
    return 2 + _varint(body) + body


def _value_len(v: object, config: bool) -> int:
    t = type(v)
    if t is float:
        return 9
    if t is int:
        return _int_scalar(v)
    if t is list:
        return _list_value(v, config)
    if config:
        if t is bool:
            return 2
        if t is str:
            return _field(_utf8(v))
        if t is bytes:
            return _field(len(v))
    raise Unsupported(f"record value of type {t.__name__}")


def _scalar_record_len(record: ConfigRecord | MetricRecord, config: bool) -> int:
    n = 0
    for k, v in record.__dict__["_data"].items():
        value = _value_len(v, config)
        key = len(k) if type(k) is str and k.isascii() else _utf8(k)
        item = (2 if value < 128 else 1 + _varint(value)) + value  # tag, length and the value message
        if key:
            item += (2 if key < 128 else 1 + _varint(key)) + key
        n += (2 if item < 128 else 1 + _varint(item)) + item
    return n


# ---- ArrayRecord / Array / ArrayChunk ------------------------------------------------------------

_JSON_LEN: dict[object, int] = {}  # name, or (dtype, shape, stype) of exact str/tuple-of-int types


def _json_len(value: object) -> int:
    """``len(json.dumps(value))`` for a name, or the sum over an array's (dtype, shape, stype); memoised
    only for exact types, so that equal keys mean equal JSON (``True == 1`` but ``true`` is not ``1``)."""
    n = _JSON_LEN.get(value)
    if n is None:
        n = len(json.dumps(value)) if type(value) is str else sum(len(json.dumps(v)) for v in value)
        if len(_JSON_LEN) > 4096:
            _JSON_LEN.clear()
        _JSON_LEN[value] = n
    return n


def _refs_len(names) -> int:
    """Length of ``json.dumps({name: <64-hex id>})`` over ``names``."""
    n = 0
    for name in names:
        if type(name) is not str:
            raise Unsupported(f"record name of type {type(name).__name__}")
        n += _json_len(name) + 70  # '"id": "<64>"' plus ', ' (the braces stand in for the last one)
    return n or 2


def _meta_len(a: Array) -> int:
    """JSON length of an array's dtype, shape and stype."""
    dtype, shape, stype = a.dtype, a.shape, a.stype
    if type(dtype) is str and type(stype) is str and type(shape) is tuple:
        for s in shape:
            if type(s) is not int:
                break
        else:
            return _json_len((dtype, shape, stype))
    return len(json.dumps(dtype)) + len(json.dumps(shape)) + len(json.dumps(stype))  # raises as deflate does


_ABSENT = object()


class _Chunks:
    """Distinct chunks (``data[start:start + length]``) seen so far, found by comparing bytes: the first
    chunk of a length is new; later ones are compared (``memcmp``) with those of equal length and tail."""

    def __init__(self) -> None:
        self.first: dict[int, tuple[bytes, int, int] | None] = {}
        self.tails: dict[tuple[int, bytes], list[tuple[bytes, int, int]]] = {}
        self.count = 0

    def _bucket(self, data: bytes, start: int, length: int) -> list[tuple[bytes, int, int]]:
        end = start + length
        return self.tails.setdefault((length, data[max(start, end - _TAIL):end]), [])

    def index(self, data: bytes, start: int, length: int) -> int:
        """The chunk's number among the distinct chunks seen (the current ``count`` if it is new)."""
        entry = self.first.get(length, _ABSENT)
        if entry is _ABSENT:
            self.first[length] = (data, start, self.count)
            self.count += 1
            return self.count - 1
        if entry is not None:  # a second chunk of this length: from now on, bucket by tails
            self.first[length] = None
            self._bucket(entry[0], entry[1], length).append(entry)
        bucket = self._bucket(data, start, length)
        whole = start == 0 and length == len(data)
        for other, other_start, idx in bucket:
            if (other == data if whole and other_start == 0 and len(other) == length
                    else other.startswith(memoryview(data)[start:start + length], other_start)):
                return idx
        bucket.append((data, start, self.count))
        self.count += 1
        return self.count - 1


def _chunking(data: bytes, chunk_size: int) -> tuple[list[tuple[int, int]], int]:
    """A multi-chunk array's distinct chunks ``(start, length)`` and the JSON length of its index list."""
    local, firsts, pattern = _Chunks(), [], []
    for start in range(0, len(data), chunk_size):
        n = min(chunk_size, len(data) - start)
        i = local.index(data, start, n)
        if i == len(firsts):  # repeated chunks of one array (e.g. zeros) are one child
            firsts.append((start, n))
        pattern.append(i)
    return firsts, len(str(pattern))


def _array_record_tree(records: list[ArrayRecord]) -> tuple[int, int]:
    """Bytes of the distinct ArrayRecords, Arrays and ArrayChunks under ``records``, and the number
    of distinct records (``(size, count)``)."""
    chunk_size = _array_module.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    chunks = _Chunks()
    arrays: dict[tuple[int, int], list[tuple[Array, int]]] = {}  # (data length, body length) -> seen
    seen_records: set[tuple] = set()
    total = n_arrays = 0
    for rec in records:
        items = rec.__dict__["_data"]
        sig, distinct = [], set()
        for name, a in items.items():
            if type(a) is not Array:
                raise Unsupported(f"array of type {type(a).__name__}")
            data = a.data
            if type(data) is not bytes:
                raise Unsupported(f"array data of type {type(data).__name__}")
            size = len(data)
            if size <= chunk_size:
                parts, ids_len = ((0, size),) if size else (), 3 if size else 2  # "[0]" or "[]"
            else:
                parts, ids_len = _chunking(data, chunk_size)
            body = 53 + _meta_len(a) + ids_len  # '{"dtype": , "shape": , "stype": , "arraychunk_ids": }'
            same = None
            seen = arrays.get((size, body))
            if seen is None:
                arrays[(size, body)] = seen = []
            else:
                for other, idx in seen:
                    if other is a or (other.data == data and _same_meta(other, a)):
                        same = idx
                        break
            if same is None:
                same, n_arrays = n_arrays, n_arrays + 1
                seen.append((a, same))
                n = len(parts)
                total += 8 + (65 * n - 1 if n else 0) + len(str(body)) + body  # "Array <ids> <body>\x00"
                for start, length in parts:
                    new = chunks.count
                    if chunks.index(data, start, length) == new:  # a chunk not met before in this message
                        total += 13 + len(str(length)) + length  # "ArrayChunk  <n>\x00" and the bytes
            sig.append((name, same))
            distinct.add(same)
        sig = tuple(sig)
        if sig not in seen_records:
            seen_records.add(sig)
            total += _object(11, len(distinct), _refs_len(items))
    return total, len(seen_records)


def _same_meta(a: Array, b: Array) -> bool:
    return json.dumps([a.dtype, a.shape, a.stype]) == json.dumps([b.dtype, b.shape, b.stype])


# ---- the message ------------------------------------------------------------------------------------

def fast_message_bytes(msg: Message) -> int:
    """``Σ len(deflate())`` over the distinct objects of ``msg``, computed from lengths.

    Raises
    ------
    Unsupported
        If ``msg`` holds anything the fast rules do not cover exactly (measure it with the reference).
    """
    if type(msg) is not Message:
        raise Unsupported(f"message of type {type(msg).__name__}")
    content = msg.__dict__["_content"]
    total = _message_own(msg, content is not None)
    if content is None:
        return total
    if type(content) is not RecordDict:
        raise Unsupported(f"content of type {type(content).__name__}")
    items = content.__dict__["_data"]
    array_records, scalar = [], {}
    for rec in items.values():
        t = type(rec)
        if t is ArrayRecord:
            array_records.append(rec)
        elif t is ConfigRecord or t is MetricRecord:
            size = _object(len(t.__qualname__), 0, _scalar_record_len(rec, t is ConfigRecord))
            scalar.setdefault((t, size), []).append(rec)
        else:
            raise Unsupported(f"record of type {t.__name__}")
    distinct = 0
    if array_records:
        size, distinct = _array_record_tree(array_records)
        total += size
    for (_, size), recs in scalar.items():
        kinds = {recs[0].deflate()} if len(recs) > 1 else None  # equal size: compare the bytes
        for r in recs[1:]:
            kinds.add(r.deflate())
        count = len(kinds) if kinds else 1
        total += count * size
        distinct += count
    return total + _object(10, distinct, _refs_len(items))
