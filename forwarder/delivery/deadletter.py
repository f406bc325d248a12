"""The dead-letter file: append-only NDJSON of events Evidently will never accept.

One line per event: ``project``, ``event`` (exactly as sent), ``eventId`` (the
id the intake answered for it, null when unknown), ``errorCode``,
``errorMessage``, ``attempts``, ``first_attempt_at``, ``last_attempt_at``. Each
write is flushed and fsynced before the events are acknowledged to the buffer,
so an event is never in neither place. Past ``max_bytes`` the file is rotated
to ``<path>.1`` (the previous ``.1`` is kept as ``.2``...; at most ``KEEP``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from datetime import datetime, timezone

import orjson

KEEP = 5


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def lines(project: str, events: list[bytes], code: str, message: str, attempts: int,
          first_attempt_at: float, last_attempt_at: float, event_ids: list[str | None] | None = None) -> bytes:
    """The NDJSON lines for dead-lettered events; the event bytes are embedded as sent."""
    tail = orjson.dumps({
        "errorCode": code, "errorMessage": message, "attempts": attempts,
        "first_attempt_at": _iso(first_attempt_at), "last_attempt_at": _iso(last_attempt_at),
    })[1:]
    head = b'{"project":' + orjson.dumps(project) + b',"event":'
    ids = event_ids or [None] * len(events)
    return b"".join(head + event + b',"eventId":' + orjson.dumps(event_id) + b"," + tail + b"\n"
                    for event, event_id in zip(events, ids))


class DeadLetterWriter:
    """Appends dead-letter lines from a worker thread, one write at a time."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        # One write at a time: a rotation never races a write, and lines never interleave.
        with self._lock:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            try:
                size = os.path.getsize(self.path)
            except FileNotFoundError:
                size = 0
            rotated = bool(size) and size + len(data) > self.max_bytes
            if rotated:
                self._rotate()
            with open(self.path, "ab", opener=_owner_only) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if rotated or not size:
                _fsync_directory(directory)  # the renames and the new file's name are durable too

    def _rotate(self) -> None:
        """<path> becomes <path>.1, the previous .1 becomes .2, ...; the oldest beyond KEEP is dropped."""
        for i in range(KEEP - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")


def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)  # dead letters hold whole events


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
