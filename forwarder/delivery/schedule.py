"""The sender's schedule: batches due now (fresh from the batcher) or later (retries)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Callable

from forwarder.delivery.batch import Batch
from forwarder.wakeup import EARLY, Wakeup


class Schedule:
    """Batches ordered by due time; fresh batches are bounded, retries are not
    (their events are already counted in the buffer's bounds)."""

    def __init__(self, clock: Callable[[], float], fresh_limit: int) -> None:
        self._clock = clock
        self._fresh_limit = fresh_limit
        self._heap: list[tuple[float, int, Batch, bool]] = []
        self._seq = itertools.count()
        self._fresh = 0
        self._wake = Wakeup()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._heap)

    async def put_fresh(self, batch: Batch) -> None:
        """Add a new batch, due now; waits while ``fresh_limit`` fresh batches are not yet taken."""
        while self._fresh >= self._fresh_limit:
            self._room.clear()
            await self._room.wait()
        self._fresh += 1
        self._push(self._clock(), batch, True)

    def put_later(self, batch: Batch, due: float) -> None:
        self._push(due, batch, False)

    def _push(self, due: float, batch: Batch, fresh: bool) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), batch, fresh))
        self._wake.set()

    async def get(self) -> Batch:
        """The next batch once it is due."""
        while True:
            if self._heap and self._heap[0][0] <= self._clock() + EARLY:
                _, _, batch, fresh = heapq.heappop(self._heap)
                if fresh:
                    self._fresh -= 1
                    self._room.set()
                return batch
            timeout = self._heap[0][0] - self._clock() if self._heap else None
            self._wake.clear()
            await self._wake.wait(timeout)

    def expedite(self, wanted: Callable[[Batch], bool]) -> int:
        """Make the wanted batches due now (e.g. retries of an outage that ended); returns how many."""
        now = self._clock()
        moved = 0
        for i, (due, seq, batch, fresh) in enumerate(self._heap):
            if due > now and wanted(batch):
                self._heap[i] = (now, seq, batch, fresh)
                moved += 1
        if moved:
            heapq.heapify(self._heap)
            self._wake.set()
        return moved

    def take_all(self) -> list[Batch]:
        batches = [entry[2] for entry in self._heap]
        self._heap.clear()
        return batches

    def batches(self) -> list[Batch]:
        """Read-only: every batch in the schedule, in no particular order."""
        return [entry[2] for entry in self._heap]

    def oldest(self) -> float | None:
        return min((entry[2].received_at for entry in self._heap), default=None)
