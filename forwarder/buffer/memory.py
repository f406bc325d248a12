"""The memory buffer: accepted events in RAM, fast and lost if the process dies."""

from __future__ import annotations

from collections import deque
from typing import Callable

from forwarder.buffer.contract import (READ_MAX_EVENTS, Bounded, Bounds, BufferFull, Chunk, Lease, Receipt,
                                       resolve)
from forwarder.config import BufferConfig
from forwarder.observability import Observer
from forwarder.wakeup import Wakeup


class MemoryBuffer(Bounded):
    """Accepted events in RAM: fast, lost if the process dies."""

    def __init__(self, config: BufferConfig, observer: Observer) -> None:
        self._bounds = Bounds(config)
        self._drop_oldest = config.when_full == "drop_oldest"
        self._observer = observer
        # Unread events wait as plain tuples of str/float/bytes: the cyclic GC
        # stops tracking such tuples, so a backlog of millions does not make every
        # full collection walk it (docs/architecture.md, "Memory").
        # (project, received_at, events, append id, index of the first event in its append)
        self._unread: deque[tuple[str, float, tuple[bytes, ...], int, int]] = deque()
        self._appends = 0  # the last append's id
        self._readable = Wakeup()
        self._closed = False

    async def open(self, on_crash: Callable[[BaseException], None] | None = None) -> int:
        return 0  # nothing survives in memory, and no task of its own to crash

    async def append(self, project: str, events: list[bytes], received_at: float) -> int:
        """Take all the events or none (BufferFull); returns the append's id (its events' eventIds)."""
        size = sum(map(len, events))
        if not self._bounds.fits(len(events), size) and self._drop_oldest:
            self._drop_unread(len(events), size)
        if not self._bounds.fits(len(events), size):
            self._bounds.rejecting = True
            raise BufferFull()
        self._bounds.add(len(events), size)
        self._appends += 1
        self._unread.append((project, received_at, tuple(events), self._appends, 0))
        self._readable.set()
        return self._appends

    def _drop_unread(self, n: int, size: int) -> None:
        # Only events the batcher has not read can go: the rest are in flight.
        dropped = 0
        while self._unread and not self._bounds.fits(n, size):
            project, received_at, events, append_id, index = self._unread.popleft()
            excess = max(self._bounds.depth + n - self._bounds.max_events, 1)
            take, rest = events[:excess], events[excess:]
            if rest:
                self._unread.appendleft((project, received_at, rest, append_id, index + len(take)))
            self._bounds.remove(len(take), sum(map(len, take)))
            dropped += len(take)
        if dropped:
            self._observer.events_dropped("buffer_full", dropped)

    async def read(self, timeout: float | None) -> list[Chunk]:
        """Unread chunks (up to READ_MAX_EVENTS events) under one lease, waiting up to ``timeout``."""
        if not self._unread and not self._closed:
            self._readable.clear()
            if not await self._readable.wait(timeout):
                return []
        taken: list[tuple[str, float, tuple[bytes, ...], int, int]] = []
        n = 0
        while self._unread and n < READ_MAX_EVENTS:
            entry = self._unread.popleft()
            taken.append(entry)
            n += len(entry[2])
        if not taken:
            return []
        lease = Lease((len(e) for entry in taken for e in entry[2]), origins=[])
        out: list[Chunk] = []
        first = 0
        for project, received_at, events, append_id, index in taken:
            out.append(Chunk(project, received_at, events, lease, first))
            lease.origins.append((first, append_id, index))  # type: ignore[union-attr]
            first += len(events)
        return out

    async def ack(self, receipt: Receipt) -> None:
        resolve(receipt, self._bounds, self._observer)

    def oldest_unread(self) -> float | None:
        return self._unread[0][1] if self._unread else None  # received_at

    def stop_reading(self) -> None:
        """Wake a waiting reader so that the batcher can drain and stop."""
        self._closed = True
        self._readable.set()

    async def close(self) -> None:
        self.stop_reading()
