"""The batcher: per-project batches of at most ``batch.max_events``. No I/O.

A batch's deadline is fixed when its first event arrives and is never reset, so
a steady trickle still flushes on time; a batch also flushes the moment it is
full, and everything flushes on drain.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from forwarder.buffer.contract import Chunk
from forwarder.config import BatchConfig
from forwarder.delivery.batch import Batch, FlushReason
from forwarder.observability import Observer
from forwarder.tasks import supervise
from forwarder.wakeup import EARLY

__all__ = ["Batch", "Batcher", "FlushLoop", "FlushReason", "Sink", "Source"]


@dataclass(slots=True)
class _Open:
    """A batch being filled. Its limits are fixed when it opens, so a reload
    never applies a new size or deadline to events already in it."""

    max_events: int
    deadline: float  # on the batcher's monotonic clock
    batch: Batch


class Batcher:
    """Groups chunks into per-project batches; the caller hands sealed ones to the sender."""

    def __init__(self, config: BatchConfig, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._max = config.max_events
        self._interval = config.flush_interval
        self._clock = clock
        self._wall = wall
        self._open: dict[str, _Open] = {}

    def reconfigure(self, config: BatchConfig) -> None:
        """New limits apply to batches opened from now on; open ones keep the limits they opened with."""
        self._max = config.max_events
        self._interval = config.flush_interval

    def add(self, chunk: Chunk) -> list[Batch]:
        """Add a chunk's events; return the batches that became full."""
        sealed: list[Batch] = []
        events = chunk.events
        start = 0
        while start < len(events):
            filling = self._open.get(chunk.project)
            if filling is None:
                filling = self._open[chunk.project] = self._new(chunk)
            take = min(filling.max_events - len(filling.batch), len(events) - start)
            filling.batch.fill(events[start:start + take], chunk.lease, chunk.first + start)
            start += take
            if len(filling.batch) >= filling.max_events:
                sealed.append(self._seal(chunk.project, FlushReason.SIZE))
        return sealed

    def _new(self, chunk: Chunk) -> _Open:
        # The deadline counts the time the event already spent in the buffer
        # (recovered events from disk flush at once).
        waited = max(0.0, self._wall() - chunk.received_at)
        deadline = self._clock() + max(0.0, self._interval - waited)
        return _Open(self._max, deadline, Batch(chunk.project, chunk.received_at))

    def _seal(self, project: str, reason: FlushReason) -> Batch:
        batch = self._open.pop(project).batch
        batch.seal(reason)
        return batch

    def next_deadline(self) -> float | None:
        """The earliest deadline on the batcher's clock, or None when nothing is open."""
        return min((o.deadline for o in self._open.values()), default=None)

    def expired(self) -> list[Batch]:
        now = self._clock() + EARLY
        due = [p for p, o in self._open.items() if o.deadline <= now]
        return [self._seal(p, FlushReason.DEADLINE) for p in due]

    def drain(self) -> list[Batch]:
        return [self._seal(p, FlushReason.DRAIN) for p in list(self._open)]

    def oldest(self) -> float | None:
        return min((o.batch.received_at for o in self._open.values()), default=None)

    def open_by_project(self) -> dict[str, int]:
        """Read-only, for /status: events in open batches per project."""
        return {project: len(o.batch) for project, o in self._open.items()}


class Sink(Protocol):
    async def send(self, batch: Batch) -> None: ...


class Source(Protocol):
    async def read(self, timeout: float | None) -> list[Chunk]: ...

    def stop_reading(self) -> None: ...


class FlushLoop:
    """The one coroutine that moves events from the buffer into sealed batches."""

    def __init__(self, source: Source, batcher: Batcher, sink: Sink, observer: Observer,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self.batcher = batcher
        self._sink = sink
        self._observer = observer
        self._clock = clock
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self, on_crash: Callable[[BaseException], None]) -> None:
        """Start the loop; a crash of the loop's own bookkeeping is reported, not hidden."""
        self._task = supervise(asyncio.create_task(self._run(), name="forwarder-flush-loop"), on_crash)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    LIVE_KEYS = ("batch.max_events", "batch.flush_interval")

    async def reconfigure(self, batch: BatchConfig) -> None:
        """New batch limits (reload): see ``Batcher.reconfigure``."""
        self.batcher.reconfigure(batch)

    async def _run(self) -> None:
        while True:
            deadline = self.batcher.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            chunks = await self._source.read(timeout)
            for chunk in chunks:
                for batch in self.batcher.add(chunk):
                    await self._emit(batch)
            for batch in self.batcher.expired():
                await self._emit(batch)
            if self._stopping and not chunks:
                break
        for batch in self.batcher.drain():
            await self._emit(batch)

    async def _emit(self, batch: Batch) -> None:
        self._observer.batch_flushed(batch.flush_reason.value, len(batch))
        await self._sink.send(batch)

    async def stop(self, timeout: float) -> bool:
        """Stop reading, flush every partial batch to the sink, within ``timeout``."""
        self._stopping = True
        self._source.stop_reading()
        if self._task is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
