"""The intake's per-request parse, validate and encode work, in-process (cheap).

``orjson`` is the general path (``request_events`` + ``encode_all``), which every
body can take; the json side does the same parse and encode with no validation
at all, so it is the lower bound of what dropping orjson would cost. ``msgspec``
is the fast path the intake tries first for bodies of 1 KiB and more
(``encode_wire_body``), the figure behind that dependency.
"""

from __future__ import annotations

import json
import sys
import time
import timeit
import tracemalloc

import orjson

from benchmarks import workload
from benchmarks.context import Context
from benchmarks.report import Row
from forwarder.evidently.events import (_data_are_objects, _decode_wire_body, encode_all, encode_event, encode_wire_body,
                              request_events)

COMPACT = (",", ":")


def with_orjson(body: bytes, now: float) -> list[bytes]:
    return encode_all(request_events(orjson.loads(body)), now)[0]


def with_msgspec(body: bytes, now: float) -> list[bytes]:
    encoded = encode_wire_body(body, now)
    assert encoded is not None, "the benchmark body must take the fast path"
    return encoded


def with_json(body: bytes, now: float) -> list[bytes]:
    return [json.dumps({"data": e["data"], "timestamp": e.get("timestamp", now),
                        "type": e.get("type", workload.EVENT_TYPE)}, separators=COMPACT).encode()
            for e in json.loads(body)["events"]]


def validation_floor(body: bytes, now: float) -> bool:
    """The checks no intake can skip, with nothing kept: decode and type-check the
    body in C, and check that every ``data`` string holds one JSON object."""
    return _data_are_objects([e.data for e in _decode_wire_body(body).events])


def per_call_us(fn, body: bytes, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Best of 5 repeats, each ~seconds/5 long."""
    now = time.time()
    timer = timeit.Timer(lambda: fn(body, now))
    number, _ = timer.autorange()
    number = max(1, int(number * seconds / 5 / 0.2))
    return min(timer.repeat(5, number)) / number * 1e6


def held_per_event(n: int = 2000) -> tuple[float, float]:
    """Bytes really allocated per kept ``encode_event`` result, and per exact-size copy of it.

    sys.getsizeof reports the logical length; tracemalloc sees the allocation.
    """
    evs = workload.events(0, n)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [encode_event(e, i, 0.0) for i, e in enumerate(evs)]
        as_encoded = (tracemalloc.get_traced_memory()[0] - before) / n
        del kept
        before = tracemalloc.get_traced_memory()[0]
        kept = [b"".join((encode_event(e, i, 0.0), b"")) for i, e in enumerate(evs)]
        trimmed = (tracemalloc.get_traced_memory()[0] - before) / n
        del kept
    finally:
        tracemalloc.stop()
    return as_encoded, trimmed


async def codec(ctx: Context) -> list[Row]:
    rows = []
    for n in (1, 50):
        body = workload.body(workload.events(0, n))
        assert [orjson.loads(e) for e in with_orjson(body, 0.0)] == [orjson.loads(e) for e in with_json(body, 0.0)]
        fast = per_call_us(with_orjson, body, ctx.pick(1.0, 0.1))
        slow = per_call_us(with_json, body, ctx.pick(1.0, 0.1))
        rows.append(Row("codec", f"orjson vs json: parse+encode, {n} event{'s' if n > 1 else ''}/POST",
                        f"orjson {fast:,.1f} us", f"json {slow:,.1f} us", slow / fast,
                        notes=["ratio is json / orjson CPU per request (json side without validation)"]))
        if n > 1:
            assert [orjson.loads(e) for e in with_msgspec(body, 0.0)] == [orjson.loads(e) for e in with_orjson(body, 0.0)]
            quick = per_call_us(with_msgspec, body, ctx.pick(1.0, 0.1))
            rows.append(Row("codec", f"msgspec fast path vs orjson general path, {n} events/POST",
                            f"msgspec {quick:,.1f} us", f"orjson {fast:,.1f} us", fast / quick,
                            notes=["ratio is orjson / msgspec CPU per request, both validating every event"]))
            floor = per_call_us(validation_floor, body, ctx.pick(1.0, 0.1))
            rows.append(Row("codec", f"validation floor vs msgspec fast path, {n} events/POST",
                            f"validation only {floor:,.1f} us", f"msgspec fast path {quick:,.1f} us", floor / quick,
                            notes=["validation only = msgspec decode with the field checks plus the one-pass check "
                                   "of the data strings, nothing encoded or kept: what any intake that refuses "
                                   "bad events pays before buffering anything. Against the intake row's budget "
                                   "(a 0.55 ratio leaves 0.8 x the bare request's CPU, ~35 us) it shows how "
                                   "little is left for encoding, buffering and the response"]))
    held, trimmed = held_per_event()
    size = sys.getsizeof(encode_event(workload.event(0), 0, 0.0))
    rows.append(Row("codec", "memory held per encoded event (tracemalloc)", f"encode_event result {held:,.0f} B",
                    f"exact-size copy {trimmed:,.0f} B", held / trimmed,
                    notes=[f"sys.getsizeof says {size} B either way: orjson.dumps returns bytes whose allocation is "
                           "its whole output buffer (4 KiB since orjson 3.12), never shrunk; "
                           "b''.join((b, b'')) makes the exact-size copy"]))
    return rows
