"""The disk buffer's writer: one store cycle at a time on the buffer's thread.

Appends, acks and the read queue up on the event loop; the writer hands all of
them to ``Store.cycle`` together (group commit) and settles each with the
result: committed or refused appends, the reader's rows, the loop's
``Progress``. docs/diskbuffer.md, "Threading and cycles".
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from forwarder.buffer.contract import Bounds, BufferFull
from forwarder.buffer.disk.files import Opened
from forwarder.buffer.disk.space import DiskFull
from forwarder.buffer.disk.store import Append, Cycled, Store
from forwarder.observability import Observer
from forwarder.tasks import supervise
from forwarder.wakeup import Wakeup

ERROR_BACKOFF = 0.2  # seconds between two cycles after a failed one, so a broken disk does not spin
DISK_FULL_RETRY_AFTER = 5.0  # seconds a client is told to wait when the disk itself is full
DISK_FULL_RETRY = 1.0  # seconds a full disk refuses appends before the next insert is tried
SETTLE_AFTER = 1.0  # seconds without work after which the WAL is checkpointed into the database file


class BufferDisplaced(RuntimeError):
    """The database file at buffer.path was deleted or replaced under the running daemon."""


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
    why_full: str = ""  # why the disk counts as full, for /readyz
    displaced: str = ""
    unsettled: bool = False  # the WAL holds commits the database file does not have yet

    def advance(self, cycled: Cycled, now: float) -> None:
        self.committed, self.cursor, self.oldest = cycled.max_id, cycled.cursor, cycled.oldest
        self.commits = cycled.commits
        self.displaced = cycled.displaced
        self.unsettled = cycled.unsettled
        if cycled.disk_full:
            self.disk_full_until, self.why_full = now + DISK_FULL_RETRY, cycled.why_full
        elif cycled.appended:
            self.disk_full_until, self.why_full = 0.0, ""
        self.check()

    def check(self) -> None:
        assert 0 <= self.cursor <= self.committed, f"cursor {self.cursor} past committed {self.committed}"
        assert self.resent_upto <= self.committed, f"resent_upto {self.resent_upto} past {self.committed}"


@dataclass(slots=True)
class _Pending:
    append: Append
    done: asyncio.Future[None]


@dataclass(slots=True)
class _Queue:
    """Work for the next cycle; bounded, because every pending append already holds its place in the bounds."""

    appends: list[_Pending] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    reader: asyncio.Future[Cycled] | None = None

    def __bool__(self) -> bool:
        return bool(self.appends or self.acks or self.reader is not None)


class Writer:
    """Runs the queued work as store cycles, one at a time, and settles it with each cycle's result."""

    def __init__(self, store: Store, thread: ThreadPoolExecutor, bounds: Bounds, observer: Observer,
                 clock: Callable[[], float], settle_after: float = SETTLE_AFTER) -> None:
        self._store = store
        self._thread = thread
        self._bounds = bounds  # a refused append gives its place back
        self._observer = observer
        self._clock = clock
        self._settle_after = settle_after
        self.progress = Progress()
        self.readable = Wakeup()  # set when committed rows wait to be read
        self._queue = _Queue()
        self._in_cycle: _Queue | None = None  # what the store's thread works on now
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_crash: Callable[[BaseException], None] = lambda e: None
        self._broken: BaseException | None = None
        self.closing = False

    def start(self, opened: Opened, on_crash: Callable[[BaseException], None] | None) -> None:
        self.progress.committed = opened.max_id
        self.progress.resent_upto = opened.max_read
        self.progress.check()
        if on_crash is not None:
            self._on_crash = on_crash
        self._task = supervise(asyncio.create_task(self._loop(), name="forwarder-buffer-writer"), self._crashed)
        self.readable.set()  # recovered rows are readable at once

    async def stop(self) -> None:
        """Run the cycles for what is queued, then end."""
        self.closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def check_usable(self, reading: bool = False) -> None:
        if self._broken is not None:
            raise RuntimeError("the disk buffer's writer has stopped") from self._broken
        if self.closing:
            raise RuntimeError("the disk buffer is closed")
        if self.progress.displaced and not reading:
            raise BufferDisplaced(self.progress.displaced)

    # queueing work for the next cycle

    def append(self, append: Append) -> asyncio.Future[None]:
        """Done once the append is committed; fails with why it was refused."""
        pending = _Pending(append, asyncio.get_running_loop().create_future())
        self._queue.appends.append(pending)
        self._wake.set()
        return pending.done

    def read(self) -> asyncio.Future[Cycled]:
        """The next cycle hands out the unread rows (``Cycled.chunks``)."""
        assert self._queue.reader is None, "one reader at a time"
        reader = self._queue.reader = asyncio.get_running_loop().create_future()
        self._wake.set()
        return reader

    def ack(self, ids: Iterable[int]) -> None:
        """Deleted by the next cycle."""
        self._queue.acks.extend(ids)
        self._wake.set()

    # the cycles

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self.closing:
                    return
                self._wake.clear()
                if self.progress.unsettled and not self.progress.displaced:
                    # A quiet backlog must not live in the WAL alone: checkpoint it once idle.
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._settle_after)
                    except TimeoutError:
                        await self._cycle(_Queue(), idle=True)
                else:
                    await self._wake.wait()
                continue
            work, self._queue = self._queue, _Queue()
            if work.reader is not None and work.reader.done():
                work.reader = None  # its reader was cancelled: do not move the cursor for nobody
            await self._cycle(work)

    async def _cycle(self, work: _Queue, idle: bool = False) -> None:
        self._in_cycle = work
        try:
            cycled = await asyncio.get_running_loop().run_in_executor(
                self._thread, self._store.cycle, [p.append for p in work.appends], work.acks,
                work.reader is not None, idle)
        except Exception as e:
            self._cycle_failed(e, work)
            await asyncio.sleep(ERROR_BACKOFF)
            return
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
            self.readable.set()
        if cycled.appended < len(work.appends) and not cycled.displaced:
            self._observer.buffer_write_failed(self._store.file, "disk full", len(work.appends) - cycled.appended, 0)
        if cycled.wal_lost:
            self._observer.limited("error", "buffer_wal_lost", path=self._store.file, reason=cycled.wal_lost)
        if displaced_now:
            self._observer.log.error("buffer_displaced", path=self._store.file, reason=cycled.displaced)
            self._on_crash(BufferDisplaced(cycled.displaced))

    def _cycle_failed(self, error: Exception, work: _Queue) -> None:
        self._in_cycle = None
        self._observer.buffer_write_failed(self._store.file, repr(error), len(work.appends), len(work.acks))
        full = isinstance(error, DiskFull)
        if full:
            self.progress.disk_full_until = self._clock() + DISK_FULL_RETRY
            self.progress.why_full = str(error)
        for p in work.appends:
            self._bounds.remove(len(p.append.events), p.append.size)
            _resolve(p.done, BufferFull(DISK_FULL_RETRY_AFTER) if full else error)
        if not self.closing:
            self._queue.acks.extend(work.acks)  # an ack must not be lost because of a transient error
        if work.reader is not None:
            if full and not self.closing and self._queue.reader is None:
                self._queue.reader = work.reader  # read again once deleting fits
            else:
                _resolve(work.reader, error)  # the flush loop stops loudly; a restart re-checks the file

    def _crashed(self, exc: BaseException) -> None:
        self._broken = exc
        self._observer.log.error("buffer_writer_crashed", error=repr(self._broken), exc_info=self._broken)
        for work in (self._in_cycle, self._queue):
            if work is None:
                continue
            for future in [p.done for p in work.appends] + ([work.reader] if work.reader else []):
                _resolve(future, self._broken)
        self._on_crash(exc)


def _resolve(future: asyncio.Future, outcome: object) -> None:  # type: ignore[type-arg]
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
