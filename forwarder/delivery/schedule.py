"""The sender's schedule: batches due now (fresh from the batcher) or later (retries).

Small batches of one project can share a call. A resend of a few throttled
events ``rides``: from its due time it goes along with the next batch of its
project that has room, and only if none comes within ``RIDE_WAIT`` does it go
in a call of its own (which takes the project's other riders along). A tiny
call per resend would spend the request quota on one or two events each
(issue 25). Fresh batches waiting for a worker can be taken along the same way.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable

from forwarder.delivery.batch import Batch
from forwarder.wakeup import EARLY, Wakeup

# Seconds a riding resend waits past its due time for a batch of its project to
# go with: batch.flush_interval's default, within which a project with traffic sends.
RIDE_WAIT = 1.0


@dataclass(slots=True, eq=False)
class _Entry:
    due: float  # when a worker takes it, alone if need be
    seq: int
    batch: Batch = field(compare=False)
    fresh: bool = field(compare=False)
    joins: float | None = field(compare=False)  # from when it may go along with another batch; None: never
    taken: bool = field(default=False, compare=False)

    def __lt__(self, other: _Entry) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)


class Schedule:
    """Batches ordered by due time; fresh batches are bounded, retries are not
    (their events are already counted in the buffer's bounds)."""

    def __init__(self, clock: Callable[[], float], fresh_limit: int) -> None:
        self._clock = clock
        self._fresh_limit = fresh_limit
        self._heap: list[_Entry] = []  # taken entries stay until they reach the top
        self._joinable: dict[str, list[_Entry]] = {}  # per project, the entries that may go along
        self._waiting = 0  # entries not taken
        self._seq = itertools.count()
        self._fresh = 0
        self._wake = Wakeup()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return self._waiting

    async def put_fresh(self, batch: Batch) -> None:
        """Add a new batch, due now; waits while ``fresh_limit`` fresh batches are not yet taken."""
        while self._fresh >= self._fresh_limit:
            self._room.clear()
            await self._room.wait()
        self._fresh += 1
        now = self._clock()
        self._push(_Entry(now, next(self._seq), batch, True, now))

    def put_later(self, batch: Batch, due: float) -> None:
        self._push(_Entry(due, next(self._seq), batch, False, None))

    def ride(self, batch: Batch, due: float, wait: float = RIDE_WAIT) -> None:
        """A resend: from ``due`` it goes with the next batch of its project that has room, alone ``wait`` s later."""
        self._push(_Entry(due + wait, next(self._seq), batch, False, due))

    def _push(self, entry: _Entry) -> None:
        heapq.heappush(self._heap, entry)
        self._waiting += 1
        if entry.joins is not None:
            self._joinable.setdefault(entry.batch.project, []).append(entry)
        self._wake.set()

    async def get(self) -> Batch:
        """The next batch once it is due."""
        while True:
            while self._heap and self._heap[0].taken:
                heapq.heappop(self._heap)
            if self._heap and self._heap[0].due <= self._clock() + EARLY:
                entry = heapq.heappop(self._heap)
                self._take(entry)
                return entry.batch
            timeout = self._heap[0].due - self._clock() if self._heap else None
            self._wake.clear()
            await self._wake.wait(timeout)

    def _take(self, entry: _Entry) -> None:
        entry.taken = True
        self._waiting -= 1
        if entry.fresh:
            self._fresh -= 1
            self._room.set()
        if entry.joins is not None:
            joinable = self._joinable[entry.batch.project]
            joinable.remove(entry)
            if not joinable:
                del self._joinable[entry.batch.project]

    def along(self, batch: Batch, usable: Callable[[Batch], bool]) -> list[Batch]:
        """Batches of ``batch``'s project that may go in its call now and fit its room, oldest first."""
        room = batch.room
        if not room:
            return []
        now = self._clock() + EARLY
        taken = []
        for entry in sorted(self._joinable.get(batch.project, ()), key=lambda e: (e.joins, e.seq)):
            size = len(entry.batch)
            if entry.joins <= now and size <= room and not entry.batch.solo and usable(entry.batch):
                self._take(entry)
                taken.append(entry.batch)
                room -= size
                if not room:
                    break
        return taken

    def expedite(self, wanted: Callable[[Batch], bool]) -> int:
        """Make the wanted batches due now (e.g. retries of an outage that ended); returns how many."""
        now = self._clock()
        moved = 0
        for entry in self._heap:
            if not entry.taken and entry.due > now and wanted(entry.batch):
                entry.due = now
                moved += 1
        if moved:
            heapq.heapify(self._heap)
            self._wake.set()
        return moved

    def take_all(self) -> list[Batch]:
        batches = [entry.batch for entry in self._heap if not entry.taken]
        self._heap.clear()
        self._joinable.clear()
        self._waiting = 0
        return batches

    def batches(self) -> list[Batch]:
        """Read-only: every batch in the schedule, in no particular order."""
        return [entry.batch for entry in self._heap if not entry.taken]

    def oldest(self) -> float | None:
        return min((entry.batch.received_at for entry in self._heap if not entry.taken), default=None)
