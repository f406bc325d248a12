"""The events the benchmarks send: ~250 B of raw JSON each, like a typical custom event.

Request bodies are in PutProjectEvents' wire form (``data`` a JSON string), what
boto3 and every SDK client send; the intake's object-``data`` convenience is
tested, not benchmarked.
"""

from __future__ import annotations

import orjson

PROJECT = "bench"
EVENT_TYPE = "aws.evidently.custom"
TIMESTAMP = 1764158400.125  # a fixed epoch: intake cost must not depend on the clock


def event(i: int, tag: str = "") -> dict:
    """Event ``i``; ``tag`` (e.g. a latency probe id) goes into its data."""
    data = {
        "userId": f"user-{i % 10_000_000:07d}",
        "feature": "checkout-redesign",
        "variation": "treatment-b" if i % 2 else "control",
        "value": round(10 + (i % 997) * 0.25, 2),
        "currency": "EUR",
        "page": "/cart/checkout",
        "session": f"s-{i * 2654435761 % 2**32:08x}",
    }
    if tag:
        data["bench"] = tag
    return {"data": data, "timestamp": TIMESTAMP, "type": EVENT_TYPE}


def events(start: int, n: int) -> list[dict]:
    return [event(i) for i in range(start, start + n)]


def body(evs: list[dict]) -> bytes:
    """An intake request body (the PutProjectEvents wire form)."""
    return orjson.dumps({"events": [wire_event(e) for e in evs]})


def raw_size(evs: list[dict]) -> float:
    """Average raw JSON size of the events as sent, in bytes: the memory benchmark's yardstick."""
    return sum(len(orjson.dumps(wire_event(e))) for e in evs) / len(evs)


def wire_event(e: dict) -> dict:
    """The event as PutProjectEvents carries it (data as a JSON string), for SDK calls."""
    return {"data": orjson.dumps(e["data"]).decode(), "timestamp": e["timestamp"], "type": e["type"]}
