"""The disk buffer: accepted events in SQLite, so that a 200 survives a crash.

``<buffer.path>/buffer.sqlite3`` in WAL mode holds one row per event
(``events(id, project, received_at, body)``) until the sender acknowledges it;
a ``meta`` table holds the schema version and the highest id ever handed to the
sender. ``append`` returns only once its rows are committed, so a 200 from the
intake means "on disk".

buffer.fsync:
  "always"  PRAGMA synchronous=FULL: every commit is fsynced; acknowledged
            events survive a power loss or an OS crash. Costs one fsync per
            group commit.
  "normal"  PRAGMA synchronous=NORMAL: commits reach the OS but the WAL is
            fsynced only at checkpoints; acknowledged events survive a process
            crash (kill -9, OOM kill), while a power loss may lose the last
            transactions. The default: far cheaper on slow disks.

Threading: every SQLite call runs on the buffer's own thread (one connection,
one thread); the event loop only keeps counters. Work reaches that thread in
*cycles*: one transaction carrying every append that arrived since the last
cycle (group commit), every ack queued since then (deleted in ranges of
consecutive ids, never a row that was not acknowledged) and the pending read,
so that a busy intake costs one commit per cycle, not one per request. Acks do
not wait for their commit: a lost ack only means a duplicate after a crash.

Duplicates (forwarder_duplicates_total): the cycle that hands rows to the
sender also records the highest id handed out (``meta.max_read``) in the same
transaction, so it is on disk before any of those rows can be sent. After a
restart, rows with ``id <= max_read`` are still there only because their ack
was not durable: they were read by the previous run and may have reached
Evidently. Each is counted once, when it is read again. It is an upper bound:
some of them were still waiting in the batcher or for a retry when the process
died and never reached Evidently.

A damaged database (not a database, malformed, failing ``PRAGMA quick_check``,
wrong schema) is moved aside to ``buffer.sqlite3.corrupt-<UTC time>`` (with its
``-wal``/``-shm``, same suffix scheme so that sqlite3 can still open the copy),
reported through ``buffer_corrupted``, and the buffer starts empty: a daemon
that crash-loops on its own buffer delivers nothing. Errors that do not mean
damage (locked, permission, I/O) stop the start-up instead. A lock file keeps a
second forwarder off the same ``buffer.path``.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from .buffer import READ_MAX_EVENTS, Bounded, Bounds, BufferFull, Chunk, Lease, Receipt, resolve
from .config import BufferConfig
from .observability import Observer
from .wakeup import Wakeup

SCHEMA_VERSION = 1
DB_NAME = "buffer.sqlite3"
LOCK_NAME = "buffer.lock"
ERROR_BACKOFF = 0.2  # seconds between two cycles after a failed one, so a broken disk does not spin
DISK_FULL_RETRY_AFTER = 5.0  # seconds a client is told to wait when the disk itself is full
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file is truncated to after a checkpoint
# Error names that mean the file is damaged; anything else (locked, cannot
# open, I/O error) is the environment's problem and must not cost the data.
_DAMAGE = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE events (id INTEGER PRIMARY KEY, project TEXT NOT NULL, received_at REAL NOT NULL,"
    " body BLOB NOT NULL)",
    f"INSERT INTO meta (key, value) VALUES ('schema_version', {SCHEMA_VERSION}), ('max_read', 0)",
)
_EVENT_COLUMNS = ["id", "project", "received_at", "body"]


class Damaged(Exception):
    """The database file is not a buffer this version can use."""


@dataclass(slots=True)
class _Append:
    project: str
    received_at: float
    events: list[bytes]
    first_id: int
    size: int
    done: asyncio.Future[None]


@dataclass(slots=True)
class Opened:
    rows: int
    nbytes: int
    max_id: int
    max_read: int
    moved_to: str = ""  # where a damaged file went, "" when none
    damage: str = ""


@dataclass(slots=True)
class Cycled:
    max_id: int
    cursor: int
    chunks: list[Chunk]


class Store:
    """The SQLite side of the buffer. Not thread-safe: only the buffer's thread calls it."""

    def __init__(self, directory: str, fsync: str) -> None:
        self.directory = directory
        self.file = os.path.join(directory, DB_NAME)
        self._synchronous = "FULL" if fsync == "always" else "NORMAL"
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self.max_id = 0  # highest committed id
        self.cursor = 0  # highest id handed to the reader in this run
        self._persisted_read = 0  # meta.max_read
        self.oldest: float | None = None  # received_at of the oldest unread row
        self.commits = 0

    # opening

    def open(self) -> Opened:
        os.makedirs(self.directory, exist_ok=True)
        self._take_lock()
        try:
            return self._connect()
        except Damaged as e:
            error = str(e)
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorname", "") not in _DAMAGE:
                self._close_connection()
                raise OSError(f"buffer.path: cannot open {self.file}: {e}") from e
            error = f"{e} ({e.sqlite_errorname})"
        self._close_connection()
        moved_to = self._move_aside()
        opened = self._connect()
        opened.moved_to, opened.damage = moved_to, error
        return opened

    def _take_lock(self) -> None:
        fd = os.open(os.path.join(self.directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(f"buffer.path {self.directory} is in use by another forwarder") from None
        self._lock_fd = fd

    def _connect(self) -> Opened:
        conn = self._conn = sqlite3.connect(self.file, isolation_level=None)
        # Checked before anything is written, so a file moved aside is left as it was found.
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise Damaged("quick_check: " + "; ".join(problems[:3]))
        fresh = self._check_schema(conn)
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise OSError(f"{self.file}: SQLite cannot use WAL mode on this file system")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        if fresh:
            with _transaction(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
        rows, nbytes, max_id = conn.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0), coalesce(max(id), 0) FROM events").fetchone()
        max_read = conn.execute("SELECT value FROM meta WHERE key = 'max_read'").fetchone()[0]
        # Ids keep growing past max_read even if every row was deleted, so a
        # new row is never mistaken for one the previous run had sent.
        self.max_id = max(max_id, max_read)
        self._persisted_read = max_read
        self.cursor = 0
        self.oldest = self._oldest_unread()
        return Opened(rows, nbytes, self.max_id, max_read)

    def _check_schema(self, conn: sqlite3.Connection) -> bool:
        """True for a new, empty file; raises Damaged for anything but our schema."""
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return True
        if tables != {"meta", "events"}:
            raise Damaged(f"unexpected tables {sorted(tables)}")
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            raise Damaged(f"schema version {version and version[0]}, expected {SCHEMA_VERSION}")
        columns = [row[1] for row in conn.execute("PRAGMA table_info(events)")]
        if columns != _EVENT_COLUMNS:
            raise Damaged(f"events columns {columns}, expected {_EVENT_COLUMNS}")
        if conn.execute("SELECT value FROM meta WHERE key = 'max_read'").fetchone() is None:
            raise Damaged("meta.max_read is missing")
        return False

    def _move_aside(self) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target, n = f"{self.file}.corrupt-{stamp}", 1
        while os.path.exists(target):
            n += 1
            target = f"{self.file}.corrupt-{stamp}.{n}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.file + suffix):
                os.replace(self.file + suffix, target + suffix)
        return target

    # the cycle: one transaction for everything that queued up meanwhile

    def cycle(self, appends: list[_Append], acks: list[int], read: bool) -> Cycled:
        conn = self._conn
        assert conn is not None
        max_id, cursor, chunks = self.max_id, self.cursor, []
        oldest = self.oldest
        with _transaction(conn):
            if appends:
                conn.executemany("INSERT INTO events (id, project, received_at, body) VALUES (?, ?, ?, ?)",
                                 _rows(appends))
                last = appends[-1]
                max_id = last.first_id + len(last.events) - 1
            if acks:
                conn.executemany("DELETE FROM events WHERE id BETWEEN ? AND ?", _ranges(acks))
            if read:
                rows = conn.execute("SELECT id, project, received_at, body FROM events WHERE id > ? "
                                    "ORDER BY id LIMIT ?", (cursor, READ_MAX_EVENTS)).fetchall()
                chunks = _chunks(rows)
                # A short read saw every committed row: the cursor also skips
                # the ids of rows dropped meanwhile.
                cursor = rows[-1][0] if len(rows) == READ_MAX_EVENTS else max_id
                if cursor > self._persisted_read:
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'max_read'", (cursor,))
            if read or (appends and oldest is None):
                oldest = self._oldest_unread(cursor)
        self.commits += 1
        self.max_id, self.cursor, self.oldest = max_id, cursor, oldest
        self._persisted_read = max(self._persisted_read, cursor)
        return Cycled(max_id, cursor, chunks)

    def _oldest_unread(self, cursor: int | None = None) -> float | None:
        assert self._conn is not None
        row = self._conn.execute("SELECT received_at FROM events WHERE id > ? ORDER BY id LIMIT 1",
                                 (self.cursor if cursor is None else cursor,)).fetchone()
        return None if row is None else row[0]

    def drop_unread(self, events: int, nbytes: int) -> tuple[int, int]:
        """Delete the oldest unread rows until ``events`` and ``nbytes`` are freed; all or nothing."""
        conn = self._conn
        assert conn is not None
        freed_events = freed_bytes = 0
        with _transaction(conn):
            rows = conn.execute("SELECT id, length(body) FROM events WHERE id > ? ORDER BY id", (self.cursor,))
            for row_id, size in rows:
                freed_events, freed_bytes = freed_events + 1, freed_bytes + size
                if freed_events >= events and freed_bytes >= nbytes:
                    break
            else:
                return 0, 0  # even every unread row would not make room; nothing was changed
            rows.close()
            conn.execute("DELETE FROM events WHERE id > ? AND id <= ?", (self.cursor, row_id))
        self.commits += 1
        self.oldest = self._oldest_unread()
        return freed_events, freed_bytes

    # closing

    def close(self) -> None:
        try:
            if self._conn is not None:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._close_connection()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _rows(appends: list[_Append]):
    for a in appends:
        project, received_at, row_id = a.project, a.received_at, a.first_id
        for body in a.events:
            yield row_id, project, received_at, body
            row_id += 1


def _ranges(ids: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive ids: a 50-event batch is usually one DELETE, and
    no id outside ``ids`` is ever inside a range."""
    ids = sorted(ids)
    out: list[tuple[int, int]] = []
    lo = hi = ids[0]
    for i in ids[1:]:
        if i == hi + 1:
            hi = i
        else:
            out.append((lo, hi))
            lo = hi = i
    out.append((lo, hi))
    return out


def _chunks(rows: list[tuple[int, str, float, bytes]]) -> list[Chunk]:
    """Consecutive rows of one project become one chunk (dated by its oldest row), all under one lease."""
    lease = Lease((len(row[3]) for row in rows), [row[0] for row in rows])
    out: list[Chunk] = []
    current: Chunk | None = None
    for position, (_, project, received_at, body) in enumerate(rows):
        if current is None or current.project != project:
            current = Chunk(project, received_at, [], lease, position)
            out.append(current)
        current.events.append(body)  # type: ignore[attr-defined]
    return out


class DiskBuffer(Bounded):
    """Accepted events in SQLite: each ``append`` is committed before it returns."""

    def __init__(self, config: BufferConfig, observer: Observer) -> None:
        self._bounds = Bounds(config)
        self._drop_oldest = config.when_full == "drop_oldest"
        self._observer = observer
        self._store = Store(config.path, config.fsync)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forwarder-buffer")
        self._next_id = 1
        self._committed = 0  # the loop's copy of the store's max_id and cursor
        self._cursor = 0
        self._resent_upto = 0  # rows up to this id were handed out by a previous run
        # Pending work for the next cycle; bounded because every pending append
        # already holds its place in the bounds.
        self._appends: list[_Append] = []
        self._acks: list[int] = []
        self._reader: asyncio.Future[Cycled] | None = None
        self._wake = asyncio.Event()
        self._readable = Wakeup()
        self._drop_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._cycle: tuple[list[_Append], asyncio.Future[Cycled] | None] = ([], None)  # in the thread now
        self._broken: BaseException | None = None
        self._stopped = False
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None

    @property
    def commits(self) -> int:
        """Transactions committed so far (group commit makes this far fewer than appends)."""
        return self._store.commits

    @property
    def file(self) -> str:
        return self._store.file

    # lifecycle

    async def open(self) -> int:
        """Open or create the database (moving a damaged one aside); returns the events recovered."""
        opened = await asyncio.get_running_loop().run_in_executor(self._thread, self._store.open)
        if opened.moved_to:
            self._observer.buffer_corrupted(self._store.file, opened.moved_to, opened.damage)
        self._bounds.add(opened.rows, opened.nbytes)
        self._next_id = opened.max_id + 1
        self._committed = opened.max_id
        self._resent_upto = opened.max_read
        self._writer = asyncio.create_task(self._write_loop(), name="forwarder-buffer-writer")
        self._writer.add_done_callback(self._writer_done)
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
        finally:
            self._thread.shutdown(wait=False)

    # the intake side

    async def append(self, project: str, events: list[bytes], received_at: float) -> None:
        """Take all the events or none (BufferFull); returns once they are committed."""
        self._check_usable()
        n, size = len(events), sum(map(len, events))
        if not n:
            return
        if not self._bounds.fits(n, size) and self._drop_oldest:
            await self._make_room(n, size)
        if not self._bounds.fits(n, size):
            self._bounds.rejecting = True
            raise BufferFull()
        self._bounds.add(n, size)
        request = _Append(project, received_at, events, self._next_id, size,
                          asyncio.get_running_loop().create_future())
        self._next_id += n
        self._appends.append(request)
        self._wake.set()
        await request.done

    async def _make_room(self, n: int, size: int) -> None:
        # One drop at a time, so two full appends do not both drop for the same room.
        async with self._drop_lock:
            if self._bounds.fits(n, size) or n > self._bounds.max_events or size > self._bounds.max_bytes:
                return
            need_events = max(0, self._bounds.depth + n - self._bounds.max_events)
            need_bytes = max(0, self._bounds.nbytes + size - self._bounds.max_bytes)
            dropped, dropped_bytes = await asyncio.get_running_loop().run_in_executor(
                self._thread, self._store.drop_unread, need_events, need_bytes)
            if dropped:
                self._bounds.remove(dropped, dropped_bytes)
                self._observer.events_dropped("buffer_full", dropped)

    # the sender side

    async def read(self, timeout: float | None) -> list[Chunk]:
        """Unread rows in id order as same-project chunks (up to READ_MAX_EVENTS), waiting up to ``timeout``."""
        if self._stopped:
            return []
        self._check_usable()
        if self._committed <= self._cursor:
            self._readable.clear()
            if not await self._readable.wait(timeout):
                return []
            if self._stopped:
                return []
        assert self._reader is None, "one reader at a time"
        self._reader = asyncio.get_running_loop().create_future()
        self._wake.set()
        cycled = await self._reader
        self._count_resent(cycled.chunks)
        return cycled.chunks

    def _count_resent(self, chunks: list[Chunk]) -> None:
        ids = chunks[0].lease.ids if chunks else None
        if not ids or ids[0] > self._resent_upto:
            return
        self._observer.possible_duplicates(bisect.bisect_right(ids, self._resent_upto))

    async def ack(self, receipt: Receipt) -> None:
        """Forget acknowledged rows: counted at once, deleted by the next cycle."""
        for lease, positions in resolve(receipt, self._bounds, self._observer):
            ids = lease.ids
            assert ids is not None
            self._acks.extend(ids[p] for p in positions)
        self._wake.set()

    def oldest_unread(self) -> float | None:
        return self._store.oldest

    # the writer: one cycle at a time on the buffer's thread

    def _has_work(self) -> bool:
        return bool(self._appends or self._acks or self._reader is not None)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._has_work():
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            appends, self._appends = self._appends, []
            acks, self._acks = self._acks, []
            reader, self._reader = self._reader, None
            if reader is not None and reader.done():
                reader = None  # its reader was cancelled: do not move the cursor for nobody
            self._cycle = (appends, reader)
            try:
                cycled = await loop.run_in_executor(self._thread, self._store.cycle, appends, acks,
                                                    reader is not None)
            except Exception as e:
                self._cycle_failed(e, appends, acks, reader)
                await asyncio.sleep(ERROR_BACKOFF)
                continue
            self._committed, self._cursor = cycled.max_id, cycled.cursor
            for a in appends:
                if not a.done.done():
                    a.done.set_result(None)
            if reader is not None and not reader.done():
                reader.set_result(cycled)
            if self._committed > self._cursor:
                self._readable.set()

    def _cycle_failed(self, error: Exception, appends: list[_Append], acks: list[int],
                      reader: asyncio.Future[Cycled] | None) -> None:
        disk_full = getattr(error, "sqlite_errorname", "") == "SQLITE_FULL"
        self._observer.buffer_write_failed(self._store.file, repr(error), len(appends), len(acks))
        for a in appends:
            self._bounds.remove(len(a.events), a.size)
            if not a.done.done():
                a.done.set_exception(BufferFull(DISK_FULL_RETRY_AFTER) if disk_full else error)
        if not self._closing:
            self._acks.extend(acks)  # an ack must not be lost because of a transient error
        if reader is not None and not reader.done():
            if disk_full:
                reader.set_result(Cycled(self._committed, self._cursor, []))
            else:
                reader.set_exception(error)  # the flush loop stops loudly; a restart re-checks the file

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._broken = task.exception()
        self._observer.log.error("buffer_writer_crashed", error=repr(self._broken), exc_info=self._broken)
        appends, reader = self._cycle
        pending = [a.done for a in appends + self._appends] + [r for r in (reader, self._reader) if r]
        for future in pending:
            if not future.done():
                future.set_exception(self._broken)  # type: ignore[arg-type]

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError("the disk buffer's writer has stopped") from self._broken
        if self._closing:
            raise RuntimeError("the disk buffer is closed")


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (cancellation included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
