"""The disk buffer: accepted events in SQLite, so that a 200 survives a crash.

The event loop side: ``append`` waits for the group commit, ``read`` for the
cycle that hands rows out, ``ack`` queues deletions. The SQLite side, on the
buffer's own thread, is ``diskstore.Store``. docs/diskbuffer.md has the design:
group commit, duplicates after a crash, damage, a displaced file, a full disk.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from .buffer import Bounded, Bounds, BufferFull, Chunk, Receipt, resolve
from .config import BufferConfig
from .diskfiles import DB_NAME
from .diskspace import DiskFull
from .diskstore import Append, Connect, Cycled, Store, connect
from .observability import Observer
from .wakeup import Wakeup

ERROR_BACKOFF = 0.2  # seconds between two cycles after a failed one, so a broken disk does not spin
DISK_FULL_RETRY_AFTER = 5.0  # seconds a client is told to wait when the disk itself is full
DISK_FULL_RETRY = 1.0  # seconds a full disk refuses appends before the next insert is tried

__all__ = ["DB_NAME", "DiskBuffer", "BufferDisplaced"]


class BufferDisplaced(RuntimeError):
    """The database file at buffer.path was deleted or replaced under the running daemon."""


@dataclass(slots=True)
class _Pending:
    append: Append
    done: asyncio.Future[None]


@dataclass(slots=True)
class Progress:
    """The loop's copy of where the store is; changed only when a cycle completes.

    Invariants (``check``): every id handed out was committed (cursor <= committed),
    and the rows a previous run handed out are below what this run commits.
    """

    committed: int = 0  # highest committed id
    cursor: int = 0  # highest id handed to the reader in this run
    resent_upto: int = 0  # rows up to this id were handed out by a previous run
    oldest: float | None = None  # received_at of the oldest unread row
    commits: int = 0
    disk_full_until: float = 0.0  # appends are refused until then (monotonic)
    displaced: str = ""

    def advance(self, cycled: Cycled, now: float) -> None:
        self.committed, self.cursor, self.oldest = cycled.max_id, cycled.cursor, cycled.oldest
        self.commits = cycled.commits
        self.displaced = cycled.displaced
        if cycled.disk_full:
            self.disk_full_until = now + DISK_FULL_RETRY
        elif cycled.appended:
            self.disk_full_until = 0.0
        self.check()

    def check(self) -> None:
        assert 0 <= self.cursor <= self.committed, f"cursor {self.cursor} past committed {self.committed}"
        assert self.resent_upto <= self.committed, f"resent_upto {self.resent_upto} past {self.committed}"


@dataclass(slots=True)
class _Queue:
    """Work for the next cycle; bounded, because every pending append already holds its place in the bounds."""

    appends: list[_Pending] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    reader: asyncio.Future[Cycled] | None = None

    def __bool__(self) -> bool:
        return bool(self.appends or self.acks or self.reader is not None)


class DiskBuffer(Bounded):
    """Accepted events in SQLite: each ``append`` is committed before it returns."""

    def __init__(self, config: BufferConfig, observer: Observer, connect_to: Connect = connect,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._bounds = Bounds(config)
        self._drop_oldest = config.when_full == "drop_oldest"
        self._observer = observer
        self._clock = clock
        self._store = Store(config.path, config.fsync, connect_to, clock)
        self.file = self._store.file
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forwarder-buffer")
        self.progress = Progress()
        self._queue = _Queue()
        self._in_cycle: _Queue | None = None  # what the store's thread works on now
        self._wake = asyncio.Event()
        self._readable = Wakeup()
        self._drop_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._on_crash: Callable[[BaseException], None] = lambda e: None
        self._broken: BaseException | None = None
        self._stopped = False
        self._closing = False
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
            return "the disk buffer's disk is full"
        return None

    # lifecycle

    async def open(self, on_crash: Callable[[BaseException], None] | None = None) -> int:
        """Open or create the database (moving a damaged one aside); returns the events recovered."""
        opened = await asyncio.get_running_loop().run_in_executor(self._thread, self._store.open)
        if opened.damage:
            self._observer.buffer_corrupted(self.file, opened.moved_to, opened.damage)
        self._bounds.add(opened.rows, opened.nbytes)
        self.progress.committed = opened.max_id
        self.progress.resent_upto = opened.max_read
        self.progress.check()
        if on_crash is not None:
            self._on_crash = on_crash
        self._writer = asyncio.create_task(self._write_loop(), name="forwarder-buffer-writer")
        self._writer.add_done_callback(self._writer_done)
        self._readable.set()  # recovered rows are readable at once
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
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._store.close)
        except Exception as e:  # closing must not hide what happened before; the WAL keeps the data
            self._observer.buffer_write_failed(self.file, repr(e), 0, 0)
        finally:
            self._thread.shutdown(wait=False)

    # the intake side

    async def append(self, project: str, events: list[bytes], received_at: float) -> None:
        """Take all the events or none (BufferFull); returns once they are committed."""
        self._check_usable()
        n, size = len(events), sum(map(len, events))
        if not n:
            return
        if self.progress.disk_full_until > self._clock():
            raise BufferFull(DISK_FULL_RETRY_AFTER)
        if not self._bounds.fits(n, size) and self._drop_oldest:
            await self._make_room(n, size)
        if not self._bounds.fits(n, size):
            self._bounds.rejecting = True
            raise BufferFull()
        self._bounds.add(n, size)
        pending = _Pending(Append(project, received_at, events, size), asyncio.get_running_loop().create_future())
        self._queue.appends.append(pending)
        self._wake.set()
        await pending.done

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
        self._check_usable(reading=True)
        if self.progress.committed <= self.progress.cursor:
            self._readable.clear()
            if not await self._readable.wait(timeout):
                return []
            if self._stopped:
                return []
        assert self._queue.reader is None, "one reader at a time"
        reader = self._queue.reader = asyncio.get_running_loop().create_future()
        self._wake.set()
        cycled = await reader
        self._count_resent(cycled.chunks)
        return cycled.chunks

    def _count_resent(self, chunks: list[Chunk]) -> None:
        ids = chunks[0].lease.ids if chunks else None
        if not ids or ids[0] > self.progress.resent_upto:
            return
        self._observer.possible_duplicates(bisect.bisect_right(ids, self.progress.resent_upto))

    async def ack(self, receipt: Receipt) -> None:
        """Forget acknowledged rows: counted at once, deleted by the next cycle."""
        for lease, positions in resolve(receipt, self._bounds, self._observer):
            ids = lease.ids
            assert ids is not None, "a lease of this buffer carries row ids"
            self._queue.acks.extend(ids[p] for p in positions)
        self._wake.set()

    def oldest_unread(self) -> float | None:
        return self.progress.oldest

    # the writer: one cycle at a time on the buffer's thread

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            work, self._queue = self._queue, _Queue()
            if work.reader is not None and work.reader.done():
                work.reader = None  # its reader was cancelled: do not move the cursor for nobody
            self._in_cycle = work
            try:
                cycled = await loop.run_in_executor(self._thread, self._store.cycle,
                                                    [p.append for p in work.appends], work.acks,
                                                    work.reader is not None)
            except Exception as e:
                self._cycle_failed(e, work)
                await asyncio.sleep(ERROR_BACKOFF)
                continue
            self._in_cycle = None
            self._cycle_done(cycled, work)

    def _cycle_done(self, cycled: Cycled, work: _Queue) -> None:
        displaced_now = cycled.displaced and not self.progress.displaced
        self.progress.advance(cycled, self._clock())
        for i, p in enumerate(work.appends):
            if i < cycled.appended:
                _resolve(p.done, None)
                continue
            self._bounds.remove(len(p.append.events), p.append.size)
            _resolve(p.done, BufferDisplaced(cycled.displaced) if cycled.displaced
                     else BufferFull(DISK_FULL_RETRY_AFTER))
        if work.reader is not None:
            _resolve(work.reader, cycled)
        if self.progress.committed > self.progress.cursor:
            self._readable.set()
        if cycled.appended < len(work.appends) and not cycled.displaced:
            self._observer.buffer_write_failed(self.file, "disk full", len(work.appends) - cycled.appended, 0)
        if displaced_now:
            self._observer.log.error("buffer_displaced", path=self.file, reason=cycled.displaced)
            self._on_crash(BufferDisplaced(cycled.displaced))

    def _cycle_failed(self, error: Exception, work: _Queue) -> None:
        self._in_cycle = None
        self._observer.buffer_write_failed(self.file, repr(error), len(work.appends), len(work.acks))
        full = isinstance(error, DiskFull)
        if full:
            self.progress.disk_full_until = self._clock() + DISK_FULL_RETRY
        for p in work.appends:
            self._bounds.remove(len(p.append.events), p.append.size)
            _resolve(p.done, BufferFull(DISK_FULL_RETRY_AFTER) if full else error)
        if not self._closing:
            self._queue.acks.extend(work.acks)  # an ack must not be lost because of a transient error
        if work.reader is not None:
            if full and not self._closing and self._queue.reader is None:
                self._queue.reader = work.reader  # read again once deleting fits
            else:
                _resolve(work.reader, error)  # the flush loop stops loudly; a restart re-checks the file

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._broken = task.exception()
        self._observer.log.error("buffer_writer_crashed", error=repr(self._broken), exc_info=self._broken)
        for work in (self._in_cycle, self._queue):
            if work is None:
                continue
            for future in [p.done for p in work.appends] + ([work.reader] if work.reader else []):
                _resolve(future, self._broken)
        self._on_crash(self._broken)  # type: ignore[arg-type]

    def _check_usable(self, reading: bool = False) -> None:
        if self._broken is not None:
            raise RuntimeError("the disk buffer's writer has stopped") from self._broken
        if self._closing:
            raise RuntimeError("the disk buffer is closed")
        if self.progress.displaced and not reading:
            raise BufferDisplaced(self.progress.displaced)


def _resolve(future: asyncio.Future, outcome: object) -> None:  # type: ignore[type-arg]
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
