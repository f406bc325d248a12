"""Event validation and encoding: the intake's pure core.

Each accepted event is turned, once, into the exact bytes PutProjectEvents will
carry (``{"data":"<json string>","timestamp":<epoch s>,"type":"..."}``). From here
on it is never parsed or re-encoded: the sender joins these bytes into a body.
Raw JSON bytes cost a few times less memory than json.loads dicts, which is what
keeps buffered events within 2x their JSON size (benchmarks/RESULTS.md, row
"memory per buffered event").
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Iterator, Literal

import msgspec
import orjson

from forwarder.evidently.protocol import DEFAULT_EVENT_TYPE, EVENT_TYPES

_FIELDS = frozenset(("data", "timestamp", "type"))
# A tuple, not a set: membership compares, so an unhashable value (a list) is just not a type.
_EVENT_TYPES = tuple(EVENT_TYPES)
# Epoch seconds beyond this are almost surely milliseconds (year 5138).
_MAX_TIMESTAMP = 1e11
_RANGE = "between 0 (1970-01-01T00:00:00Z) and 1e11 (5138-11-16T09:46:40Z)"
# RFC 3339 section 5.6 date-time, nothing else ISO 8601 allows (week dates,
# basic format, a missing offset): fromisoformat alone takes all of those.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))", re.ASCII)
_UTC = timezone.utc


class _WireEvent(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """An event as PutProjectEvents carries it; anything else takes the general path."""

    data: str
    timestamp: (Annotated[int, msgspec.Meta(ge=0, lt=int(_MAX_TIMESTAMP))]
                | Annotated[float, msgspec.Meta(ge=0, lt=_MAX_TIMESTAMP)] | str | None) = None
    type: Literal["aws.evidently.evaluation", "aws.evidently.custom"] = DEFAULT_EVENT_TYPE


class _WireBody(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    events: list[_WireEvent]


_decode_wire_body = msgspec.json.Decoder(_WireBody).decode
_decode_raw_values = msgspec.json.Decoder(list[msgspec.Raw]).decode
_encode_wire_event = msgspec.json.Encoder().encode


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
    # orjson hands back its whole output buffer without shrinking it: kept as is,
    # every buffered event would hold that buffer. The join makes an exact-size
    # copy, the cheapest way measured (benchmarks/RESULTS.md, row "memory held
    # per encoded event").
    return b"".join((encoded, b""))


def _data(data: object, index: int) -> str:
    if type(data) is dict:
        try:
            return orjson.dumps(data).decode()
        except orjson.JSONEncodeError:  # orjson writes at most 255 levels of nesting
            raise EventError(f"events[{index}].data nests too deeply (at most 255 levels)") from None
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
            raise EventError(f"events[{index}].timestamp must be epoch seconds {_RANGE}, got {ts!r}")
        return ts  # type: ignore[return-value]
    if kind is str:
        return _rfc3339(ts, index)  # type: ignore[arg-type]
    raise EventError(f"events[{index}].timestamp must be epoch seconds or an RFC 3339 string")


def _rfc3339(text: str, index: int) -> float:
    """Epoch seconds of an RFC 3339 date-time, under the same range rule as numbers."""
    seconds = rfc3339_seconds(text)
    if seconds is None:
        raise EventError(
            f"events[{index}].timestamp {text[:40]!r} is not an RFC 3339 date-time with an offset "
            "(e.g. 2026-11-26T12:00:00Z)"
        )
    if not 0 <= seconds < _MAX_TIMESTAMP:
        raise EventError(f"events[{index}].timestamp {text[:40]!r} is not {_RANGE}")
    return seconds


def rfc3339_seconds(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 date-time (leap second included), or None if it is not one."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    offset = 0
    if not m.group(8):
        offset_hours, offset_minutes = int(m.group(10)), int(m.group(11))
        if offset_hours > 23 or offset_minutes > 59:
            return None
        offset = (offset_hours * 60 + offset_minutes) * (60 if m.group(9) == "+" else -60)
    leap = second == 60  # 23:59:60 exists in RFC 3339; datetime has no such second
    try:
        moment = datetime(year, month, day, hour, minute, 59 if leap else second, tzinfo=_UTC)
    except ValueError:  # month 13, February 30, year 0, hour 24, ...
        return None
    fraction = float(m.group(7)) if m.group(7) else 0.0
    return moment.timestamp() - offset + leap + fraction


def _type(value: object, index: int) -> str:
    if value is None:
        return DEFAULT_EVENT_TYPE
    if value in _EVENT_TYPES:
        return value  # type: ignore[return-value]
    raise EventError(f"events[{index}].type must be one of {', '.join(EVENT_TYPES)}, got {value!r}"[:300])


# Below this body size the general path is cheaper (a fixed cost the fast path
# only earns back over several events; benchmarks/RESULTS.md, "codec" rows).
WIRE_FAST_PATH_MIN_BYTES = 1024


def encode_wire_body(body: bytes, now: float) -> list[bytes] | None:
    """The fast path for a whole PutProjectEvents body whose events are all valid.

    msgspec checks the body's shape, field types, the timestamp range and the
    event type in C while decoding into slot structs (no dicts), checks every
    ``data`` string in one more pass without building it (``_data_are_objects``)
    and encodes each event at its exact size: well under the cost of
    orjson.loads plus ``encode_all`` (benchmarks/RESULTS.md, "msgspec fast path
    vs orjson general path"). None means "take the general path", which names
    whatever is wrong, event by event.
    """
    try:
        events = _decode_wire_body(body).events
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        # msgspec raises UnicodeDecodeError on invalid UTF-8 inside a string and
        # RecursionError on deep nesting: both are the general path's to name.
        return None
    if not _data_are_objects([e.data for e in events]):
        return None
    for e in events:
        ts = e.timestamp
        if ts is None:
            e.timestamp = now
        elif type(ts) is str:
            try:
                e.timestamp = _rfc3339(ts, 0)
            except EventError:
                return None
    # Exact-size copies here too: msgspec's result keeps its grown buffer.
    return [b"".join((_encode_wire_event(e), b"")) for e in events]


def _data_are_objects(datas: list[str]) -> bool:
    """True when each string is exactly one JSON object, checked in one msgspec pass.

    The strings are joined into one JSON array and decoded as raw slices: each
    slice must be exactly its string (same length, no whitespace) and start with
    '{'. Slices and single-character separators then tile the whole array, so
    no string can borrow a bracket or a quote from its neighbour. Non-ASCII text
    (slices count bytes) goes to the general path.
    """
    joined = ",".join(datas)
    if not joined.isascii():
        return False
    try:
        raws = _decode_raw_values(f"[{joined}]")
    except (msgspec.DecodeError, RecursionError):  # deep nesting: the general path names the event
        return False
    return len(raws) == len(datas) and all(
        len(raw) == len(data) and data[:1] == "{" for raw, data in zip(raws, datas))


def request_events(body: object) -> list:
    """The ``events`` list of a PutProjectEvents body; raises EventError naming the field."""
    if type(body) is not dict:
        raise EventError("the request body must be a JSON object with an 'events' list")
    events = body.get("events")
    if type(events) is not list:
        raise EventError("events is required and must be a list")
    if len(body) > 1:
        extra = set(body) - {"events"}
        raise EventError(f"unknown field {sorted(extra)[0]!r}; the body holds only 'events'")
    return events


def ndjson_lines(body: bytes) -> Iterator[tuple[int, bytes, Any]]:
    """(line number, line, parsed value or the orjson.JSONDecodeError) for each non-blank line of NDJSON."""
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, line, orjson.loads(line)
        except orjson.JSONDecodeError as e:
            yield number, line, e


def ndjson_events(body: bytes) -> list:
    """One event per non-blank line; a malformed line stays in place as an error marker."""
    return [_BadLine(str(value)) if isinstance(value, orjson.JSONDecodeError) else value
            for _, _, value in ndjson_lines(body)]


class _BadLine:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def encode_all(events: list, now: float) -> tuple[list[bytes], list[tuple[int, str]]]:
    """Encode a request's events: the accepted bytes and (index, message) per rejected event."""
    encoded: list[bytes] = []
    errors: list[tuple[int, str]] = []
    loads, dumps, types = orjson.loads, orjson.dumps, _EVENT_TYPES
    for i, event in enumerate(events):
        # The common case inline: an event already in its wire form (what boto3
        # and PutProjectEvents clients send) is re-encoded as it is, with no
        # per-event calls or new dict (benchmarks/RESULTS.md, "codec" rows).
        if type(event) is dict and len(event) == 3:
            data, ts, kind = event.get("data"), event.get("timestamp"), event.get("type")
            if (type(data) is str and data[:1] == "{" and kind in types
                    and (type(ts) is float or type(ts) is int) and 0 <= ts < _MAX_TIMESTAMP):  # NaN fails too
                try:
                    parsed = loads(data)
                except orjson.JSONDecodeError:
                    parsed = None
                if type(parsed) is dict:
                    encoded.append(b"".join((dumps(event), b"")))  # exact-size copy: see encode_event
                    continue
        try:
            if type(event) is _BadLine:
                raise EventError(f"events[{i}] is not valid JSON: {event.reason}")
            encoded.append(encode_event(event, i, now))
        except EventError as e:
            errors.append((i, str(e)))
    return encoded, errors
