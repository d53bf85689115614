"""Bytes on the wire: every message the server sends or receives, measured as Flower serialises it.

Flower 1.39 moves a :class:`~flwr.app.Message` as a tree of *inflatable objects* (the message with
its metadata, its ``RecordDict``, each record, each ``Array`` and its chunks), each serialised by
``deflate()`` into a header plus a protobuf body; a SuperNode pulls exactly the objects of its own
message (objects with the same content, hence the same id, travel once per message). The size of a
message here is the sum of ``len(obj.deflate())`` over ``get_all_nested_objects(message)``: the
payload Flower pushes and pulls for it, without the gRPC/TLS framing and request envelopes.
:func:`message_bytes` computes that sum from lengths (``fedsim.strategies.wire_size``) and equals
:func:`message_bytes_reference`, which deflates and hashes every object, integer for integer.

:class:`MeteredGrid` wraps the grid the ServerApp is given, so every exchange is counted on every
strategy and engine (train, evaluate, extra exchanges such as SemiFL's static BN or ScaleCom's index
round, node discovery): ``downlink`` is what the server sends to a node, ``uplink`` what it gets back.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from flwr.app import Message

from fedsim.strategies.wire_size import fast_message_bytes

__all__ = ["message_bytes", "message_bytes_reference", "WireMeter", "MeteredGrid"]


def message_bytes(msg: Message, cache: dict[str, int] | None = None) -> int:
    """Serialised size of ``msg`` in bytes: ``Σ len(deflate())`` over its distinct inflatable objects.

    Computed from lengths (:func:`fedsim.strategies.wire_size.fast_message_bytes`: no deflation, no
    hashing); a message holding anything those rules do not cover exactly is measured with
    :func:`message_bytes_reference` instead (``cache`` is used only there). Both give the same
    integer for every message (a property test checks it).
    """
    try:
        return fast_message_bytes(msg)
    except Exception:  # Unsupported, or a value Flower itself may refuse: let the reference decide
        return message_bytes_reference(msg, cache)


def message_bytes_reference(msg: Message, cache: dict[str, int] | None = None) -> int:
    """``Σ len(deflate())`` over ``get_all_nested_objects(msg)``, as Flower deflates and hashes them.

    ``cache`` (object id -> size) lets messages that share content (the global model sent to every
    client) be deflated once; ids are content hashes, so a hit is the same bytes.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute

    total = 0
    with no_object_id_recompute():
        for oid, obj in get_all_nested_objects(msg).items():
            size = cache.get(oid) if cache is not None else None
            if size is None:
                size = len(obj.deflate())
                if cache is not None and not isinstance(obj, Message):  # a message's metadata is its own
                    cache[oid] = size
            total += size
    return total


class WireMeter:
    """Bytes per node since the last :meth:`take`: ``{node: [downlink, uplink]}``."""

    def __init__(self) -> None:
        self.by_node: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        self._cache: dict[str, int] = {}

    def sent(self, msgs: Iterable[Message]) -> None:
        for m in msgs:
            self.by_node[int(m.metadata.dst_node_id)][0] += message_bytes(m, self._cache)

    def received(self, replies: Iterable[Message]) -> None:
        for r in replies:
            self.by_node[int(r.metadata.src_node_id)][1] += message_bytes(r, self._cache)

    def take(self) -> dict[int, tuple[int, int]]:
        """The counts so far (``{node: (downlink, uplink)}``), then start again from zero."""
        out = {n: (d, u) for n, (d, u) in self.by_node.items()}
        self.by_node = defaultdict(lambda: [0, 0])
        self._cache = {}
        return out


def round_fields(counts: dict[int, tuple[int, int]]) -> dict[str, int]:
    """The round's totals, as written to ``metrics.jsonl``."""
    return {"downlink_bytes": sum(d for d, _ in counts.values()), "uplink_bytes": sum(u for _, u in counts.values())}


def client_fields(counts: dict[int, tuple[int, int]], node: int) -> dict[str, int]:
    """One node's bytes this round, as written to its ``clients.jsonl`` record."""
    d, u = counts.get(node, (0, 0))
    return {"downlink_bytes": d, "uplink_bytes": u}


class MeteredGrid:
    """A grid that counts the bytes of every message sent and received through it, and otherwise is
    the grid it wraps (every other attribute is the wrapped grid's)."""

    def __init__(self, grid: Any, meter: WireMeter | None = None) -> None:
        self.__dict__["grid"] = grid
        self.__dict__["meter"] = meter if meter is not None else WireMeter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["grid"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["grid"], name, value)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        self.meter.sent(msgs)  # after the push: the metadata is as sent
        self.meter.received(replies)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        ids = self.grid.push_messages(msgs)
        self.meter.sent(msgs)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self.meter.received(replies)
        return replies
