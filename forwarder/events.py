"""Event validation and encoding: the intake's pure core.

Each accepted event is turned, once, into the exact bytes PutProjectEvents will
carry (``{"data":"<json string>","timestamp":<epoch s>,"type":"..."}``). From here
on it is never parsed or re-encoded: the sender joins these bytes into a body.
Raw JSON bytes cost about 264 B per ~220 B event where json.loads dicts cost
1490 B, which is what keeps 200k buffered events within 2x their JSON size.
"""

from __future__ import annotations

import math
from datetime import datetime

import orjson

from .protocol import DEFAULT_EVENT_TYPE, EVENT_TYPES

_FIELDS = frozenset(("data", "timestamp", "type"))
_EVENT_TYPES = frozenset(EVENT_TYPES)
# Epoch seconds beyond this are almost surely milliseconds (year 5138).
_MAX_TIMESTAMP = 1e11


class EventError(ValueError):
    """An event the service would refuse; the message names the field."""


def encode_event(event: object, index: int, now: float) -> bytes:
    """Validate one intake event and return its final PutProjectEvents encoding."""
    if type(event) is not dict:
        raise EventError(f"events[{index}] must be a JSON object")
    if len(event) > 3 or not _FIELDS.issuperset(event):
        unknown = sorted(set(event) - _FIELDS)
        if unknown:
            raise EventError(f"events[{index}] has unknown field {unknown[0]!r}; fields are data, timestamp, type")
    encoded = orjson.dumps({
        "data": _data(event.get("data"), index),
        "timestamp": _timestamp(event.get("timestamp"), index, now),
        "type": _type(event.get("type"), index),
    })
    # orjson hands back its 4 KiB output buffer without shrinking it: kept as is,
    # 200k buffered events cost 4,216 B RSS each instead of ~300. The join makes
    # an exact-size copy (~55 ns; bytes(memoryview(...)) took ~170 ns).
    return b"".join((encoded, b""))


def _data(data: object, index: int) -> str:
    if type(data) is dict:
        return orjson.dumps(data).decode()
    if type(data) is str:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            parsed = None
        if type(parsed) is dict:
            return data
    if data is None:
        raise EventError(f"events[{index}].data is required")
    raise EventError(f"events[{index}].data must be a JSON object or a string holding one")


def _timestamp(ts: object, index: int, now: float) -> float | int:
    if ts is None:
        return now
    kind = type(ts)
    if kind is int or kind is float:
        if not (0 <= ts < _MAX_TIMESTAMP) or (kind is float and not math.isfinite(ts)):  # type: ignore[operator]
            raise EventError(f"events[{index}].timestamp must be epoch seconds between 0 and 1e11, got {ts!r}")
        return ts  # type: ignore[return-value]
    if kind is str:
        return _rfc3339(ts, index)  # type: ignore[arg-type]
    raise EventError(f"events[{index}].timestamp must be epoch seconds or an RFC 3339 string")


def _rfc3339(text: str, index: int) -> float:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or "T" not in text.upper():
        raise EventError(
            f"events[{index}].timestamp {text[:40]!r} is not an RFC 3339 date-time with an offset "
            "(e.g. 2026-11-26T12:00:00Z)"
        )
    return parsed.timestamp()


def _type(value: object, index: int) -> str:
    if value is None:
        return DEFAULT_EVENT_TYPE
    if value in _EVENT_TYPES:
        return value  # type: ignore[return-value]
    raise EventError(f"events[{index}].type must be one of {', '.join(EVENT_TYPES)}, got {value!r}"[:300])


def request_events(body: object) -> list:
    """The ``events`` list of a PutProjectEvents body; raises EventError naming the field."""
    if type(body) is not dict:
        raise EventError("the request body must be a JSON object with an 'events' list")
    events = body.get("events")
    if type(events) is not list:
        raise EventError("events is required and must be a list")
    extra = set(body) - {"events"}
    if extra:
        raise EventError(f"unknown field {sorted(extra)[0]!r}; the body holds only 'events'")
    return events


def ndjson_events(body: bytes) -> list:
    """One event per non-blank line; a malformed line stays in place as an error marker."""
    out: list = []
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError as e:
            out.append(_BadLine(str(e)))
    return out


class _BadLine:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def encode_all(events: list, now: float) -> tuple[list[bytes], list[tuple[int, str]]]:
    """Encode a request's events: the accepted bytes and (index, message) per rejected event."""
    encoded: list[bytes] = []
    errors: list[tuple[int, str]] = []
    for i, event in enumerate(events):
        try:
            if type(event) is _BadLine:
                raise EventError(f"events[{i}] is not valid JSON: {event.reason}")
            encoded.append(encode_event(event, i, now))
        except EventError as e:
            errors.append((i, str(e)))
    return encoded, errors
