"""CPU cost of the wire meter: the size from lengths against ``Σ len(deflate())`` (issue 13, goals 1-2).

Two measurements, CPU seconds (``time.process_time``) so that they hold on a loaded machine:

* per metered round trip: the messages of one round of the many-small-mlp workload (50 train
  instructions sharing one global model, 50 replies), captured from a real run, metered by a
  ``WireMeter`` exactly as ``MeteredGrid`` does, once with ``message_bytes`` (lengths,
  ``fedsim.strategies.wire_size``) and once with ``message_bytes_reference`` (deflate and SHA-256).
  Every repeat meters fresh copies of the messages (new ``Array`` objects over the same bytes), as
  a run does: Flower caches an object id on the object, so re-metering the same objects would
  flatter the reference. Both must give the same byte counts (checked);
* ``--rounds``: the rounds of ``run_local`` on the workload with ``run.vectorize = true`` and the
  per-client path, metered by each function and with the meter stubbed to 0, against
  ``bench_engine.plain_time``'s loop (ratios of CPU seconds, as in ``bench_rounds_cpu.py``).

Usage:  python bench/wire_meter.py [--repeats 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import WORKLOADS  # noqa: E402
from bench_rounds_cpu import plain_cpu  # noqa: E402
from flwr.app import Array, ArrayRecord, Message, RecordDict  # noqa: E402

import fedsim.strategies.wire_bytes as wire  # noqa: E402
from fedsim.config import scenario_from_dict  # noqa: E402
from fedsim.engines.local import run_local  # noqa: E402

METERS = {"lengths (message_bytes)": wire.message_bytes, "reference (deflate + sha256)": wire.message_bytes_reference}


def capture(raw: dict) -> tuple[list[Message], list[Message]]:
    """The instructions and replies of round 1 of ``raw`` (vectorised clients)."""
    raw = copy.deepcopy(raw)
    raw["run"].update(rounds=1, vectorize=True)
    seen: list[tuple[list[Message], list[Message]]] = []

    def hook(grid):
        inner = grid.send_and_receive

        def spy(messages, *, timeout=None):
            msgs = list(messages)
            replies = list(inner(msgs, timeout=timeout))
            seen.append((msgs, replies))
            return replies

        grid.send_and_receive = spy

    with tempfile.TemporaryDirectory() as d:
        run_local(scenario_from_dict(raw), Path(d) / "run", grid_hook=hook)
    return seen[0]


def fresh(messages: list[Message]) -> list[Message]:
    """Copies with new record and Array objects (shared records stay shared), the same bytes."""
    memo: dict[int, object] = {}

    def rec(r):
        if id(r) not in memo:
            memo[id(r)] = (ArrayRecord({k: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data)
                                        for k, a in r.items()}) if isinstance(r, ArrayRecord) else type(r)(dict(r)))
        return memo[id(r)]

    out = []
    for m in messages:
        md = copy.copy(m.metadata)
        out.append(Message(content=RecordDict({k: rec(v) for k, v in m.content.items()}), metadata=md)
                   if m.has_content() else Message(error=m.error, metadata=md))
    return out


def per_round_trip(msgs, replies, repeats: int) -> dict[str, tuple[float, dict]]:
    """Median CPU seconds per metered round trip for each meter, and its byte counts."""
    got: dict[str, list[float]] = {k: [] for k in METERS}
    counts: dict[str, dict] = {}
    original = wire.message_bytes
    try:
        for _ in range(repeats):
            for name, fn in METERS.items():  # interleaved: both see the same load
                a, b = fresh(msgs), fresh(replies)
                wire.message_bytes = fn
                t0 = time.process_time()
                meter = wire.WireMeter()
                meter.sent(a)
                meter.received(b)
                got[name].append((time.process_time() - t0) / len(msgs))
                counts[name] = meter.take()
    finally:
        wire.message_bytes = original
    return {k: (statistics.median(v), counts[k]) for k, v in got.items()}


def rounds_cpu(raw: dict, vectorize: bool, meter) -> float:
    """CPU seconds of rounds 1..R of ``run_local`` with ``meter`` as ``message_bytes``."""
    raw = copy.deepcopy(raw)
    raw["run"]["vectorize"] = vectorize
    marks: dict[int, float] = {}
    original = wire.message_bytes
    wire.message_bytes = meter
    try:
        with tempfile.TemporaryDirectory() as d:
            run_local(scenario_from_dict(raw), Path(d) / "run",
                      on_round=lambda rnd, row: marks.__setitem__(rnd, time.process_time()))
    finally:
        wire.message_bytes = original
    return marks[max(marks)] - marks[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=0, help="also time whole rounds, this many repeats")
    args = ap.parse_args()
    raw = WORKLOADS["many-small-mlp"]
    msgs, replies = capture(raw)
    res = per_round_trip(msgs, replies, args.repeats)
    (fast, fast_counts), (ref, ref_counts) = res.values()
    assert fast_counts == ref_counts, "the two meters disagree"
    down, up = fast_counts[msgs[0].metadata.dst_node_id]
    print(f"{len(msgs)} round trips per round, {down} B down and {up} B up for the first client")
    for name, (sec, _) in res.items():
        print(f"  {name:30s} {sec * 1e6:8.1f} us CPU per round trip")
    print(f"  reference / lengths: {ref / fast:.1f}x")
    if args.rounds:
        rows = {f"{path}, {meter}": (lambda v=v, m=m: rounds_cpu(raw, v, m))
                for path, v in (("vectorize = true", True), ("per client", False))
                for meter, m in (("lengths", wire.message_bytes), ("reference", wire.message_bytes_reference),
                                 ("meter stubbed", lambda msg, cache=None: 0))}
        rows = {"plain loop": lambda: plain_cpu(raw), **rows}
        plain_cpu(raw), rounds_cpu(raw, True, wire.message_bytes)  # warm-up: dataset cache, kernels
        got: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(args.rounds):
            for k, run in rows.items():
                got[k].append(run())
        base = statistics.median(got["plain loop"])
        for k, v in got.items():
            m = statistics.median(v)
            print(f"  {k:36s} CPU {m:6.3f} s  ratio {m / base:5.2f}x  {[round(x, 3) for x in v]}")


if __name__ == "__main__":
    main()
