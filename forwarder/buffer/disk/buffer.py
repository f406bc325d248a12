"""The disk buffer: accepted events in SQLite, so that a 200 survives a crash.

The event loop side: ``append`` waits for the group commit, ``read`` for the
cycle that hands rows out, ``ack`` queues deletions. The cycles are run by
``diskwriter.Writer``; the SQLite side, on the buffer's own thread, is
``diskstore.Store``. docs/diskbuffer.md has the design: group commit,
duplicates after a crash, damage, a displaced file, a full disk.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from forwarder.buffer.contract import Bounded, Bounds, BufferFull, Chunk, Receipt, resolve
from forwarder.config import BufferConfig
from forwarder.buffer.disk.files import DB_NAME
from forwarder.buffer.disk.store import Append, Connect, Store, connect
from forwarder.buffer.disk.writer import DISK_FULL_RETRY_AFTER, SETTLE_AFTER, BufferDisplaced, Progress, Writer
from forwarder.observability import Observer

__all__ = ["DB_NAME", "DiskBuffer", "BufferDisplaced", "Progress"]


class DiskBuffer(Bounded):
    """Accepted events in SQLite: each ``append`` is committed before it returns."""

    def __init__(self, config: BufferConfig, observer: Observer, connect_to: Connect = connect,
                 clock: Callable[[], float] = time.monotonic, settle_after: float = SETTLE_AFTER) -> None:
        self._bounds = Bounds(config)
        self._drop_oldest = config.when_full == "drop_oldest"
        self._observer = observer
        self._clock = clock
        self._store = Store(config.path, config.fsync, connect_to, clock)
        self.file = self._store.file
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forwarder-buffer")
        self._writer = Writer(self._store, self._thread, self._bounds, observer, clock, settle_after)
        self.progress = self._writer.progress  # the loop's copy of where the store is
        self._readable = self._writer.readable
        self._drop_lock = asyncio.Lock()
        self._stopped = False
        self._close_task: asyncio.Task[None] | None = None

    @property
    def commits(self) -> int:
        """Transactions committed so far (group commit makes this far fewer than appends)."""
        return self.progress.commits

    @property
    def problem(self) -> str | None:
        """Why the buffer cannot take events now, for /readyz; None when it can."""
        if self.progress.displaced:
            return "the disk buffer's file was displaced: draining what it holds, then stopping"
        if self.progress.disk_full_until:
            return self.progress.why_full or "the disk buffer's disk is full"
        return None

    # lifecycle

    async def open(self, on_crash: Callable[[BaseException], None] | None = None) -> int:
        """Open or create the database (moving a damaged one aside); returns the events recovered."""
        opened = await asyncio.get_running_loop().run_in_executor(self._thread, self._store.open)
        if opened.damage:
            self._observer.buffer_corrupted(self.file, opened.moved_to, opened.damage)
        if opened.ledger_problem:
            self._observer.log.warning("buffer_ledger_damaged", path=self.file, problem=opened.ledger_problem)
        self._bounds.add(opened.rows, opened.nbytes)
        self._writer.start(opened, on_crash)
        return opened.rows

    def stop_reading(self) -> None:
        """Reads return [] from now on; unread events stay on disk for the next start."""
        self._stopped = True
        self._readable.set()

    async def close(self) -> None:
        """Commit the pending acks, checkpoint the WAL and close (idempotent)."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self.stop_reading()
        await self._writer.stop()
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._store.close)
        except Exception as e:  # closing must not hide what happened before; the WAL keeps the data
            self._observer.buffer_write_failed(self.file, repr(e), 0, 0)
        finally:
            self._thread.shutdown(wait=False)

    # the intake side

    async def append(self, project: str, events: list[bytes], received_at: float) -> int:
        """Take all the events or none (BufferFull); returns once they are committed, with the append's id."""
        self._writer.check_usable()
        n, size = len(events), sum(map(len, events))
        if not n:
            return 0
        if self.progress.disk_full_until > self._clock():
            raise BufferFull(DISK_FULL_RETRY_AFTER)
        if not self._bounds.fits(n, size) and self._drop_oldest:
            await self._make_room(n, size)
        if not self._bounds.fits(n, size):
            self._bounds.rejecting = True
            raise BufferFull()
        self._bounds.add(n, size)
        append = Append(project, received_at, events, size)
        await self._writer.append(append)
        return append.first_id

    async def _make_room(self, n: int, size: int) -> None:
        # One drop at a time, so two full appends do not both drop for the same room.
        async with self._drop_lock:
            if self._bounds.fits(n, size) or n > self._bounds.max_events or size > self._bounds.max_bytes:
                return
            need_events = max(0, self._bounds.depth + n - self._bounds.max_events)
            need_bytes = max(0, self._bounds.nbytes + size - self._bounds.max_bytes)
            dropped, dropped_bytes, oldest = await asyncio.get_running_loop().run_in_executor(
                self._thread, self._store.drop_unread, need_events, need_bytes)
            self.progress.oldest = oldest
            if dropped:
                self._bounds.remove(dropped, dropped_bytes)
                self._observer.events_dropped("buffer_full", dropped)

    # the sender side

    async def read(self, timeout: float | None) -> list[Chunk]:
        """Unread rows in id order as same-project chunks under one lease, waiting up to ``timeout``."""
        if self._stopped:
            return []
        self._writer.check_usable(reading=True)
        if self.progress.committed <= self.progress.cursor:
            self._readable.clear()
            if not await self._readable.wait(timeout):
                return []
            if self._stopped:
                return []
        cycled = await self._writer.read()
        self._count_resent(cycled.chunks)
        return cycled.chunks

    def _count_resent(self, chunks: list[Chunk]) -> None:
        ids = chunks[0].lease.ids if chunks else None
        if not ids or ids[0] > self.progress.resent_upto:
            return
        self._observer.possible_duplicates(bisect.bisect_right(ids, self.progress.resent_upto))

    async def ack(self, receipt: Receipt) -> None:
        """Forget acknowledged rows: counted at once, deleted by the next cycle."""
        ids: list[int] = []
        for lease, positions in resolve(receipt, self._bounds, self._observer):
            assert lease.ids is not None, "a lease of this buffer carries row ids"
            ids.extend(lease.ids[p] for p in positions)
        self._writer.ack(ids)

    def oldest_unread(self) -> float | None:
        return self.progress.oldest
