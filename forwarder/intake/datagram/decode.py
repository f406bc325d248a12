"""Decoding datagrams into encoded events by project: the datagram intake's pure core.

A datagram holds one JSON event, or several as NDJSON lines. Each event may name
its project (``"project": "..."``, a name or an ARN) or goes to
``evidently.default_project``; the rest of it is validated and encoded by
``events.py``, exactly as the HTTP intake does. No answer goes back, so each
refusal is reported with a reason for the metric and the log.

The datagrams of one wake-up are decoded together. Those that start with their
project (``{"project": "name", ...}``, what the README's clients send) or name
none are stripped of it and joined per project into one PutProjectEvents body
for ``events.encode_wire_body``, the HTTP intake's fast path; any group it does
not take whole goes datagram by datagram through the general path
(``events.encode_all``), which names what is wrong.
"""

from __future__ import annotations

import re
from typing import Callable

import msgspec
import orjson

from forwarder.evidently.events import encode_all, encode_wire_body, ndjson_lines
from forwarder.evidently.protocol import project_error, region_error

PROJECT_CACHE_SIZE = 1024  # validated project names kept: most datagrams repeat a few projects

# reason, events, message
Reject = Callable[[str, int, str], None]

# The fast path's prefix: a project named first, in plain characters (no escapes),
# and not followed by ``data`` as an object (the fast path takes only strings,
# the wire form, so such events skip the attempt).
_LEADING_PROJECT = re.compile(rb'\{\s*"project"\s*:\s*"([A-Za-z0-9._:/-]*)"\s*,\s*(?!"data"\s*:\s*\{)')
_OBJECT_DATA = (b'{"data":{', b'{"data": {')  # the same, for an event without a project
_decode_raw_values = msgspec.json.Decoder(list[msgspec.Raw]).decode


class DatagramDecoder:
    """Turns datagrams into encoded events grouped by project; reports what it refuses."""

    def __init__(self, default_project: str, reject: Reject, region: str = "") -> None:
        self._default = default_project if project_error(default_project) is None else ""
        self._reject = reject
        self._region = region  # evidently.region: an ARN naming another one is refused
        self._valid: set[str] = set()
        self._names: dict[bytes, str] = {}  # project name as sent -> validated name

    def decode_all(self, datagrams: list[bytes], now: float, into: dict[str, list[bytes]]) -> int:
        """Add the valid events of ``datagrams`` to ``into[project]`` in order; returns how many."""
        groups: dict[str, tuple[list[bytes], list[bytes]]] = {}  # project -> (events, their datagrams)
        accepted = 0
        for data in datagrams:
            event, project = self._split(data)
            if project is None:
                if groups:  # the events before it go first: a project's events keep their order
                    accepted += self._encode_groups(groups, now, into)
                    groups = {}
                accepted += self.decode(data, now, into)
                continue
            group = groups.get(project)
            if group is None:
                groups[project] = group = ([], [])
            group[0].append(event)
            group[1].append(data)
        return accepted + self._encode_groups(groups, now, into)

    def _encode_groups(self, groups: dict[str, tuple[list[bytes], list[bytes]]], now: float,
                       into: dict[str, list[bytes]]) -> int:
        accepted = 0
        for project, (events, originals) in groups.items():
            encoded = _encode_together(events, now)
            if encoded is not None:
                into.setdefault(project, []).extend(encoded)
                accepted += len(encoded)
            else:
                for data in originals:
                    accepted += self.decode(data, now, into)
        return accepted

    def _split(self, data: bytes) -> tuple[bytes, str | None]:
        """(the event without its leading project, the project) for the fast path; project None: not eligible."""
        match = _LEADING_PROJECT.match(data)
        if match is not None:
            name = self._names.get(match.group(1)) or self._name(match.group(1))
            return b"{" + data[match.end():].rstrip(), name
        if self._default and data[:1] == b"{" and not data.startswith(_OBJECT_DATA) and b'"project"' not in data:
            return data.rstrip(), self._default
        return data, None

    def _name(self, raw: bytes) -> str | None:
        """A project name as sent, validated once; None (the general path reports it) if invalid."""
        text = raw.decode()
        if project_error(text) is not None or self._wrong_region(text) is not None:
            return None
        if len(self._names) >= PROJECT_CACHE_SIZE:
            self._names.clear()  # a bound, not an LRU: valid names come back at once
        self._names[raw] = text
        return text

    def decode(self, data: bytes, now: float, into: dict[str, list[bytes]]) -> int:
        """The general path for one datagram: add its valid events to ``into[project]``; returns how many."""
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            if b"\n" in data.strip():
                return self._lines(data, now, into)
            self._reject(*_unreadable(data, e))
            return 0
        return self._events([value], now, into)

    def _lines(self, data: bytes, now: float, into: dict[str, list[bytes]]) -> int:
        values = []
        for number, line, value in ndjson_lines(data):
            if isinstance(value, orjson.JSONDecodeError):
                reason, n, message = _unreadable(line, value)
                self._reject(reason, n, f"line {number}: {message}")
            else:
                values.append(value)
        return self._events(values, now, into)

    def _events(self, values: list, now: float, into: dict[str, list[bytes]]) -> int:
        projects: list[str] = []
        events: list = []
        for value in values:
            if type(value) is not dict:
                self._reject("invalid_event", 1, "an event must be a JSON object (one per line)")
                continue
            project = self._project(value.pop("project", None))
            if project is not None:
                projects.append(project)
                events.append(value)
        if not events:
            return 0
        encoded, errors = encode_all(events, now)
        failed = dict(errors)
        accepted = iter(encoded)
        for i, project in enumerate(projects):
            if i in failed:
                self._reject("invalid_event", 1, failed[i])
            else:
                into.setdefault(project, []).append(next(accepted))
        return len(encoded)

    def _project(self, project: object) -> str | None:
        """The event's project, or None (reported) when it has none or an invalid one."""
        if project is None:
            if not self._default:
                self._reject("missing_project", 1, 'the event has no "project" and evidently.default_project '
                                                   "is not set")
                return None
            return self._default
        if type(project) is not str:
            self._reject("invalid_project", 1, f'"project" must be a string, got {type(project).__name__}')
            return None
        if project not in self._valid:
            problem = project_error(project)
            if problem is not None:
                self._reject("invalid_project", 1, problem)
                return None
            wrong = self._wrong_region(project)
            if wrong is not None:
                self._reject("wrong_region", 1, wrong)
                return None
            if len(self._valid) >= PROJECT_CACHE_SIZE:
                self._valid.clear()
            self._valid.add(project)
        return project


    def _wrong_region(self, project: str) -> str | None:
        return region_error(project, self._region) if self._region else None


def _encode_together(events: list[bytes], now: float) -> list[bytes] | None:
    """The events of one project as one body through the fast path; None unless it takes each whole.

    The body is checked to split exactly at the datagrams' boundaries first: a
    datagram holding ``{...},{...}`` must not pass as two events because of its
    neighbours (each slice must be exactly one datagram's event).
    """
    joined = b",".join(events)
    try:
        raws = _decode_raw_values(b"[" + joined + b"]")
    except (msgspec.DecodeError, RecursionError):
        return None
    if len(raws) != len(events) or any(len(raw) != len(event) for raw, event in zip(raws, events)):
        return None
    encoded = encode_wire_body(b'{"events":[' + joined + b"]}", now)
    return encoded if encoded is not None and len(encoded) == len(events) else None


def _unreadable(data: bytes, error: orjson.JSONDecodeError) -> tuple[str, int, str]:
    """Why a datagram (or line) is not JSON: ``truncated`` when the JSON stops short at its end."""
    text = data.rstrip().decode("utf-8", "replace")  # orjson counts characters, not bytes
    if text.strip() and error.pos >= len(text):
        return "truncated", 1, f"the JSON ends before it is complete ({len(data)} bytes): {error}"
    return "not_json", 1, f"not JSON: {error}"
