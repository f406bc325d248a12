"""The buffer: a bounded log of accepted events between the intake and the batcher.

Events stay counted (``depth``, ``nbytes``) from ``append`` until ``ack``: read by
the batcher is not done, Evidently acknowledging or the dead-letter file taking
them is. ``MemoryBuffer`` lives here; ``DiskBuffer`` (SQLite) in ``diskbuffer.py``
has the same interface.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .config import BufferConfig
from .observability import Observer
from .wakeup import Wakeup

READ_MAX_EVENTS = 5000  # per read, so the batcher loop yields regularly
# Readiness comes back only below this fill ratio, so /readyz does not flap.
READY_AGAIN_RATIO = 0.9


@dataclass(slots=True)
class Chunk:
    """Events of one project appended together (one intake request)."""

    project: str
    received_at: float  # wall clock, epoch seconds
    events: list[bytes]
    ids: list[int] | None = None  # disk row ids; None in memory


class BufferFull(Exception):
    """No room for the events; the intake answers 429 with Retry-After."""

    def __init__(self, retry_after: float = 1.0) -> None:
        super().__init__("buffer is full")
        self.retry_after = retry_after


class Buffer(Protocol):
    depth: int
    nbytes: int

    @property
    def full(self) -> bool: ...

    async def open(self) -> int: ...

    async def append(self, project: str, events: list[bytes], received_at: float) -> None: ...

    async def read(self, timeout: float | None) -> list[Chunk]: ...

    async def ack(self, events: list[bytes], ids: list[int] | None) -> None: ...

    def oldest_unread(self) -> float | None: ...

    def stop_reading(self) -> None: ...

    async def close(self) -> None: ...


class Accounting:
    """Depth and byte bounds shared by both buffer kinds, with readiness hysteresis."""

    def __init__(self, config: BufferConfig) -> None:
        self.max_events = config.max_events
        self.max_bytes = config.max_bytes
        self.depth = 0
        self.nbytes = 0
        self.rejecting = False

    def fits(self, n: int, size: int) -> bool:
        return self.depth + n <= self.max_events and self.nbytes + size <= self.max_bytes

    def add(self, n: int, size: int) -> None:
        self.depth += n
        self.nbytes += size

    def remove(self, n: int, size: int) -> None:
        self.depth -= n
        self.nbytes -= size
        if (self.rejecting and self.depth <= self.max_events * READY_AGAIN_RATIO
                and self.nbytes <= self.max_bytes * READY_AGAIN_RATIO):
            self.rejecting = False


class Accounted:
    """``depth``, ``nbytes`` and ``full`` of a buffer, read from its Accounting."""

    _acct: Accounting

    @property
    def depth(self) -> int:
        return self._acct.depth

    @property
    def nbytes(self) -> int:
        return self._acct.nbytes

    @property
    def full(self) -> bool:
        return self._acct.rejecting


class MemoryBuffer(Accounted):
    """Accepted events in RAM: fast, lost if the process dies."""

    def __init__(self, config: BufferConfig, observer: Observer) -> None:
        self._acct = Accounting(config)
        self._drop_oldest = config.when_full == "drop_oldest"
        self._observer = observer
        # Unread events wait as plain tuples of str/float/bytes: the cyclic GC
        # stops tracking such tuples, so a backlog of millions does not make every
        # full collection walk it (gen-2 pauses of ~40 ms per million chunks).
        self._unread: deque[tuple[str, float, tuple[bytes, ...]]] = deque()
        self._readable = Wakeup()
        self._closed = False

    async def open(self) -> int:
        return 0

    async def append(self, project: str, events: list[bytes], received_at: float) -> None:
        """Take all the events or none (BufferFull)."""
        size = sum(map(len, events))
        if not self._acct.fits(len(events), size) and self._drop_oldest:
            self._drop_unread(len(events), size)
        if not self._acct.fits(len(events), size):
            self._acct.rejecting = True
            raise BufferFull()
        self._acct.add(len(events), size)
        self._unread.append((project, received_at, tuple(events)))
        self._readable.set()

    def _drop_unread(self, n: int, size: int) -> None:
        # Only events the batcher has not read can go: the rest are in flight.
        dropped = 0
        while self._unread and not self._acct.fits(n, size):
            project, received_at, events = self._unread.popleft()
            excess = max(self._acct.depth + n - self._acct.max_events, 1)
            take, rest = events[:excess], events[excess:]
            if rest:
                self._unread.appendleft((project, received_at, rest))
            self._acct.remove(len(take), sum(map(len, take)))
            dropped += len(take)
        if dropped:
            self._observer.events_dropped("buffer_full", dropped)

    async def read(self, timeout: float | None) -> list[Chunk]:
        """Unread chunks (up to READ_MAX_EVENTS events), waiting up to ``timeout``."""
        if not self._unread and not self._closed:
            self._readable.clear()
            if not await self._readable.wait(timeout):
                return []
        out: list[Chunk] = []
        taken = 0
        while self._unread and taken < READ_MAX_EVENTS:
            project, received_at, events = self._unread.popleft()
            out.append(Chunk(project, received_at, events))  # type: ignore[arg-type]
            taken += len(events)
        return out

    async def ack(self, events: list[bytes], ids: list[int] | None) -> None:
        self._acct.remove(len(events), sum(map(len, events)))

    def oldest_unread(self) -> float | None:
        return self._unread[0][1] if self._unread else None

    def stop_reading(self) -> None:
        """Wake a waiting reader so that the batcher can drain and stop."""
        self._closed = True
        self._readable.set()

    async def close(self) -> None:
        self.stop_reading()
