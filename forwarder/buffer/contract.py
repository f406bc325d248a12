"""The buffer: a bounded log of accepted events between the intake and the batcher.

Events stay counted (``depth``, ``nbytes``) from ``append`` until ``ack``: read by
the batcher is not done, Evidently acknowledging or the dead-letter file taking
them is. Each read hands its events out under one ``Lease``; what comes back to
``ack`` is a ``Receipt`` (runs of leases), the only way to name buffered events,
so an event is acknowledged at most once whatever the caller does.
This is the stage's contract: ``memory.MemoryBuffer`` and ``disk.buffer.DiskBuffer``
(SQLite) implement it.
"""

from __future__ import annotations

import uuid
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable, Protocol

from forwarder.config import BufferConfig
from forwarder.observability import Observer

READ_MAX_EVENTS = 5000  # per read, so the batcher loop yields regularly
# Event ids: what the intake answers as each event's "eventId" and what the delivery
# and dead-letter lines name. The forwarder's own, not Evidently's (which the
# forwarder never sees per event): UUID-shaped, a prefix random per daemon run,
# then the id of the append that took the event (8 hex) and its index in it (4 hex).
EVENT_ID_PREFIX = str(uuid.uuid4())[:24]  # 8-4-4-4- : the last group is the append's and the index


def event_id(append_id: int, index: int) -> str:
    """The eventId of the ``index``-th event of append ``append_id`` (what Buffer.append returned)."""
    return f"{EVENT_ID_PREFIX}{append_id & 0xFFFFFFFF:08x}{index & 0xFFFF:04x}"
# Readiness comes back only below this fill ratio, so /readyz does not flap.
READY_AGAIN_RATIO = 0.9


class Lease:
    """The events of one read, each resolved (acknowledged) at most once.

    Opaque outside the buffers: ``ids`` are the disk buffer's row ids (None in
    memory), ``sizes`` the encoded size of each event for the byte bound,
    ``origins`` where its events came from, for their eventIds: (first position,
    append id, that position's index in its append), ascending, one per run.
    """

    __slots__ = ("ids", "sizes", "origins", "_resolved", "unresolved")

    def __init__(self, sizes: Iterable[int], ids: Sequence[int] | None = None,
                 origins: list[tuple[int, int, int]] | None = None) -> None:
        self.sizes = array("I", sizes)
        self.ids = ids
        self.origins = origins
        self._resolved = bytearray(len(self.sizes))
        self.unresolved = len(self.sizes)

    def event_id(self, position: int) -> str | None:
        """The eventId the intake answered for the event at ``position`` (None when unknown)."""
        origins = self.origins
        if not origins:
            return None
        first, append_id, index = origins[bisect_right(origins, position, key=lambda o: o[0]) - 1]
        return event_id(append_id, index + position - first)

    def resolve(self, start: int, stop: int) -> tuple[list[int], int, int]:
        """Mark events [start, stop) resolved: (newly resolved positions, their bytes, repeats)."""
        flags = self._resolved
        if not any(flags[start:stop]):  # the usual case: none of them was resolved before
            flags[start:stop] = b"\x01" * (stop - start)
            positions = list(range(start, stop))
            self.unresolved -= stop - start
            return positions, sum(self.sizes[start:stop]), 0
        positions = [i for i in range(start, stop) if not flags[i]]
        for i in positions:
            flags[i] = 1
        self.unresolved -= len(positions)
        return positions, sum(self.sizes[i] for i in positions), (stop - start) - len(positions)


class Receipt:
    """Which buffered events a batch holds: runs ``(lease, start, stop)`` in the batch's order."""

    __slots__ = ("runs",)

    def __init__(self, runs: list[tuple[Lease, int, int]] | None = None) -> None:
        self.runs = runs if runs is not None else []

    def add(self, lease: Lease, start: int, stop: int) -> None:
        runs = self.runs
        if runs:
            last_lease, last_start, last_stop = runs[-1]
            if last_lease is lease and last_stop == start:
                runs[-1] = (lease, last_start, stop)
                return
        runs.append((lease, start, stop))

    def subset(self, indexes: Iterable[int]) -> "Receipt":
        """The receipt of the batch's events at ``indexes`` (ascending), in that order."""
        out = Receipt()
        runs = iter(self.runs)
        lease, start, stop = next(runs, (None, 0, 0))
        offset = 0  # batch index of the current run's first event
        for i in indexes:
            while lease is not None and i >= offset + (stop - start):
                offset += stop - start
                lease, start, stop = next(runs, (None, 0, 0))
            if lease is None:
                raise IndexError(f"index {i} is beyond the receipt's {offset} events")
            pos = start + i - offset
            out.add(lease, pos, pos + 1)
        return out


@dataclass(slots=True)
class Chunk:
    """Events of one project appended together (one intake request), as read."""

    project: str
    received_at: float  # wall clock, epoch seconds
    events: Sequence[bytes]
    lease: Lease
    first: int = 0  # position of the chunk's first event in its lease


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

    @property
    def problem(self) -> str | None: ...

    async def open(self, on_crash: Callable[[BaseException], None] | None = None) -> int: ...

    async def append(self, project: str, events: list[bytes], received_at: float) -> int:
        """Take all the events or none (BufferFull); returns the append's id (see ``event_id``)."""

    async def read(self, timeout: float | None) -> list[Chunk]: ...

    async def ack(self, receipt: Receipt) -> None: ...

    def oldest_unread(self) -> float | None: ...

    def stop_reading(self) -> None: ...

    async def close(self) -> None: ...


class Bounds:
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
        assert n <= self.depth and size <= self.nbytes, "removing more than the buffer holds"
        self.depth -= n
        self.nbytes -= size
        if (self.rejecting and self.depth <= self.max_events * READY_AGAIN_RATIO
                and self.nbytes <= self.max_bytes * READY_AGAIN_RATIO):
            self.rejecting = False


class Bounded:
    """``depth``, ``nbytes`` and ``full`` of a buffer, read from its Bounds."""

    _bounds: Bounds
    problem: str | None = None  # why the buffer cannot take events besides being full, for /readyz

    @property
    def depth(self) -> int:
        return self._bounds.depth

    @property
    def nbytes(self) -> int:
        return self._bounds.nbytes

    @property
    def full(self) -> bool:
        return self._bounds.rejecting


def resolve(receipt: Receipt, bounds: Bounds, observer: Observer) -> list[tuple[Lease, list[int]]]:
    """Resolve a receipt's events once: frees their room; returns the newly resolved positions per lease.

    An event acknowledged twice is a bug upstream: counted and logged, never
    subtracted twice (a negative depth would hide the loss it stands for).
    """
    out: list[tuple[Lease, list[int]]] = []
    n = size = repeats = 0
    for lease, start, stop in receipt.runs:
        positions, nbytes, again = lease.resolve(start, stop)
        if positions:
            out.append((lease, positions))
        n, size, repeats = n + len(positions), size + nbytes, repeats + again
    bounds.remove(n, size)
    if repeats:
        observer.ack_repeated(repeats)
    return out
