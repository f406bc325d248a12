"""The SQLite side of the disk buffer: one connection, used only from the buffer's own thread.

The design (schema, cycles, crash and damage handling, disk full) is in
docs/diskbuffer.md. Everything the event loop needs back comes in the return
values (``Opened``, ``Cycled``); nothing here is read from another thread.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .diskspace import Reserve, fitting, free_bytes, insert_cost, reclaim, reserve_size

from .buffer import READ_MAX_EVENTS, Chunk, Lease

SCHEMA_VERSION = 1
DB_NAME = "buffer.sqlite3"
LEDGER_NAME = "buffer.ledger"  # the highest id ever committed, rewritten after each commit
WAL_SIZE_LIMIT = 4 * 1024 * 1024  # bytes the WAL file is truncated to after a checkpoint
CHECKPOINT_INTERVAL = 1.0  # seconds: the backlog reaches the database file, not only the WAL
FULL_DISK_ACKS = 500  # ids deleted per transaction on a full disk, so that each fits in what the reserve left
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

Connect = Callable[[str], sqlite3.Connection]


def connect(file: str) -> sqlite3.Connection:
    return sqlite3.connect(file, isolation_level=None)


class DiskFull(OSError):
    """Not even deleting rows fits on the disk; the cycle is tried again later."""


class Damaged(Exception):
    """The database file is not a buffer this version can use."""


@dataclass(slots=True)
class Append:
    project: str
    received_at: float
    events: list[bytes]
    size: int  # bytes of the events, as the buffer's bounds counted them


@dataclass(slots=True)
class Opened:
    rows: int
    nbytes: int
    max_id: int  # ids of new rows start above it
    max_read: int  # rows up to this id were handed to a previous run's sender
    damage: str = ""  # what was wrong with the files found, "" when nothing
    moved_to: str = ""  # where a damaged file went, "" when it stayed


@dataclass(slots=True)
class Cycled:
    max_id: int  # highest committed id
    cursor: int  # highest id handed to the reader
    chunks: list[Chunk]
    oldest: float | None  # received_at of the oldest unread row
    appended: int  # how many of this cycle's appends, from the first, were committed; the rest were
    # refused (disk full, or the file was displaced)
    disk_full: bool
    displaced: str  # why the file at buffer.path is no longer ours, "" while it is
    commits: int


class Store:
    """The buffer's SQLite file: opening (and moving damage aside), cycles, closing."""

    def __init__(self, directory: str, fsync: str, connect_to: Connect = connect,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.file = os.path.join(directory, DB_NAME)
        self._synchronous = "FULL" if fsync == "always" else "NORMAL"
        self._connect_to = connect_to
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._ledger_fd: int | None = None
        self._identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file this run opened
        self._max_id = 0
        self._cursor = 0
        self._persisted_read = 0  # meta.max_read
        self._disk_full = False
        self._reserve = Reserve(directory, 0)  # sized at open from the file system
        self._displaced = ""
        self._commits = 0
        self._checkpointed = clock()

    # opening

    def open(self) -> Opened:
        os.makedirs(self.directory, exist_ok=True)
        self._lock_fd = lock_directory(self.directory)
        self._reserve.size = reserve_size(self.directory)
        lost = _read_ledger(os.path.join(self.directory, LEDGER_NAME))
        try:
            opened = self._connect()
        except Damaged as e:
            opened = self._replace(str(e))
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorname", "") not in _DAMAGE:
                self._close_connection()
                raise OSError(f"buffer.path: cannot open {self.file}: {e}") from e
            opened = self._replace(f"{e} ({e.sqlite_errorname})")
        if lost > opened.max_id and not opened.damage:
            # Rows the last run committed are not in the file: it was truncated, or
            # its WAL deleted or overwritten, after the process stopped.
            opened.damage = (f"the last run committed rows up to id {lost}, the file holds ids up to "
                             f"{opened.max_id}: rows committed since its last checkpoint are lost")
        self._max_id = opened.max_id = max(opened.max_id, lost)
        self._ledger_fd = os.open(os.path.join(self.directory, LEDGER_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        self._write_ledger()
        self._reserve.hold()
        return opened

    def _replace(self, damage: str) -> Opened:
        self._close_connection()
        moved_to = move_aside(self.file)
        opened = self._connect()
        opened.damage, opened.moved_to = damage, moved_to
        return opened

    def _connect(self) -> Opened:
        conn = self._conn = self._connect_to(self.file)
        # Checked before anything is written, so a file moved aside is left as it was found.
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise Damaged("quick_check: " + "; ".join(problems[:3]))
        fresh = check_schema(conn)
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise OSError(f"{self.file}: SQLite cannot use WAL mode on this file system")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        # The pages a checkpoint may add to the file stay well inside the reserve,
        # so a checkpoint after the disk filled always has room to complete.
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint={max(16, self._reserve.size // page_size // 4)}")
        if fresh:
            # Incremental vacuum lets a full disk get back the pages of delivered rows.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            with transaction(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
        stat = os.stat(self.file)
        self._identity = (stat.st_dev, stat.st_ino)
        rows, nbytes, max_id = conn.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0), coalesce(max(id), 0) FROM events").fetchone()
        if rows == 0 and conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # a file from an older version, empty: cheap to convert
            conn.execute("VACUUM")
        max_read = conn.execute("SELECT value FROM meta WHERE key = 'max_read'").fetchone()[0]
        # Ids keep growing past max_read even if every row was deleted, so a
        # new row is never mistaken for one the previous run had sent.
        self._persisted_read = max_read
        self._cursor = 0
        return Opened(rows, nbytes, max(max_id, max_read), max_read)

    # the cycle: one transaction for everything that queued up meanwhile

    def cycle(self, appends: list[Append], acks: list[int], read: bool) -> Cycled:
        conn = self._conn
        assert conn is not None
        if not self._displaced:
            self._displaced = self._check_identity()
        fitting = 0 if self._displaced else self._fitting(appends)
        if fitting < len(appends) and not self._displaced:
            # Inserting more could leave no room to checkpoint or to delete rows:
            # the rest is refused until delivered rows give their space back.
            self._disk_full = True
        if self._disk_full and not fitting:
            chunks, appended = self._on_full_disk(acks, read), 0
        else:
            try:
                chunks = self._transaction(appends[:fitting], acks, read)
                appended = fitting
                self._disk_full = fitting < len(appends)
            except sqlite3.OperationalError as e:
                if getattr(e, "sqlite_errorname", "") != "SQLITE_FULL":
                    raise
                # Deleting must work when inserting cannot: give SQLite the reserved
                # space back and commit the acks and the read without the appends.
                self._disk_full, appended = True, 0
                self._reserve.release()
                chunks = self._on_full_disk(acks, read)
        if self._clock() - self._checkpointed >= CHECKPOINT_INTERVAL:
            self._checkpoint("PASSIVE")
        return Cycled(self._max_id, self._cursor, chunks, self._oldest_unread(), appended, self._disk_full,
                      self._displaced, self._commits)

    def _transaction(self, appends: list[Append], acks: list[int], read: bool) -> list[Chunk]:
        conn = self._conn
        assert conn is not None
        max_id, cursor, chunks = self._max_id, self._cursor, []
        with transaction(conn):
            if appends:
                conn.executemany("INSERT INTO events (id, project, received_at, body) VALUES (?, ?, ?, ?)",
                                 _rows(appends, max_id + 1))
                max_id += sum(len(a.events) for a in appends)
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
        self._commits += 1
        self._max_id, self._cursor = max_id, cursor
        self._persisted_read = max(self._persisted_read, cursor)
        if appends:
            self._write_ledger()
        return chunks

    def _on_full_disk(self, acks: list[int], read: bool) -> list[Chunk]:
        """Acks and the read with no room to spare: small transactions, the WAL emptied between them."""
        for attempt in range(2):
            try:
                self._checkpoint("TRUNCATE")
                for i in range(0, len(acks), FULL_DISK_ACKS):
                    self._transaction([], acks[i:i + FULL_DISK_ACKS], False)
                    self._checkpoint("TRUNCATE")
                return self._transaction([], [], read)
            except sqlite3.OperationalError as e:
                if getattr(e, "sqlite_errorname", "") != "SQLITE_FULL":
                    raise
                if attempt == 1 or not self._reserve.held:
                    # Deleting an id twice is harmless: the caller tries every ack again later.
                    raise DiskFull(f"{self.file}: the disk is full even for deleting delivered rows") from e
                self._reserve.release()  # what the reserve is for
        raise AssertionError("unreachable")

    def _check_identity(self) -> str:
        """Why the file at buffer.path is no longer the one this run holds, or ""."""
        try:
            stat = os.stat(self.file)
        except FileNotFoundError:
            return f"{self.file} was deleted while the forwarder was running"
        if (stat.st_dev, stat.st_ino) != self._identity:
            return f"{self.file} was replaced by another file while the forwarder was running"
        return ""

    def _oldest_unread(self) -> float | None:
        assert self._conn is not None
        row = self._conn.execute("SELECT received_at FROM events WHERE id > ? ORDER BY id LIMIT 1",
                                 (self._cursor,)).fetchone()
        return None if row is None else row[0]

    def drop_unread(self, events: int, nbytes: int) -> tuple[int, int, float | None]:
        """Delete the oldest unread rows until ``events`` and ``nbytes`` are freed; all or nothing.

        Returns (events freed, bytes freed, received_at of the oldest unread row left).
        """
        conn = self._conn
        assert conn is not None
        freed_events = freed_bytes = 0
        with transaction(conn):
            rows = conn.execute("SELECT id, length(body) FROM events WHERE id > ? ORDER BY id", (self._cursor,))
            for row_id, size in rows:
                freed_events, freed_bytes = freed_events + 1, freed_bytes + size
                if freed_events >= events and freed_bytes >= nbytes:
                    break
            else:
                return 0, 0, self._oldest_unread()  # even every unread row would not make room; nothing changed
            rows.close()
            conn.execute("DELETE FROM events WHERE id > ? AND id <= ?", (self._cursor, row_id))
        self._commits += 1
        return freed_events, freed_bytes, self._oldest_unread()

    # space and durability

    def _checkpoint(self, mode: str) -> None:
        self._checkpointed = self._clock()
        try:
            self._conn.execute(f"PRAGMA wal_checkpoint({mode})")  # type: ignore[union-attr]
        except sqlite3.OperationalError:
            pass  # a full disk: the WAL keeps the data, the next checkpoint tries again

    def _write_ledger(self) -> None:
        # Not fsynced: it survives what the WAL survives (a killed process) and is
        # only ever compared with what the file holds at the next start.
        if self._ledger_fd is not None:
            os.pwrite(self._ledger_fd, b"%020d\n" % self._max_id, 0)

    def _fitting(self, appends: list[Append]) -> int:
        """How many of ``appends``, from the first, fit beside the reserve with room to checkpoint them."""
        if not appends:
            return 0
        costs = [insert_cost(len(a.events), a.size) for a in appends]
        n = fitting(costs, free_bytes(self.directory) if self._reserve.hold() else 0)
        if n < len(costs):
            assert self._conn is not None
            reclaim(self._conn, self.directory, self._reserve, self._checkpoint)
            n = fitting(costs, free_bytes(self.directory) if self._reserve.hold() else 0)
        return n

    # closing

    def close(self) -> None:
        try:
            if self._conn is not None and not self._displaced:
                self._checkpoint("TRUNCATE")
        finally:
            self._close_connection()
            for fd in (self._ledger_fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)  # the lock goes with its descriptor
            self._ledger_fd = self._lock_fd = None

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def lock_directory(directory: str) -> int:
    """An exclusive lock on ``directory`` itself, held by the returned descriptor."""
    # On the directory: a lock file can be deleted under a running daemon
    # (a cleanup script, a restored backup), the directory it lives in cannot.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(f"buffer.path {directory} is in use by another forwarder") from None
    return fd


def check_schema(conn: sqlite3.Connection) -> bool:
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


def move_aside(file: str) -> str:
    """Move ``file`` and its WAL and shared memory aside; returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = f"{file}.corrupt-{stamp}", 1
    while os.path.exists(target):
        n += 1
        target = f"{file}.corrupt-{stamp}.{n}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(file + suffix):
            os.replace(file + suffix, target + suffix)
    return target


def _read_ledger(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return int(f.read(20) or b"0")
    except (FileNotFoundError, ValueError):
        return 0


def _rows(appends: list[Append], first_id: int) -> Iterator[tuple[int, str, float, bytes]]:
    row_id = first_id
    for a in appends:
        project, received_at = a.project, a.received_at
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
    if not rows:
        return []
    lease = Lease((len(row[3]) for row in rows), [row[0] for row in rows])
    out: list[Chunk] = []
    current: Chunk | None = None
    for position, (_, project, received_at, body) in enumerate(rows):
        if current is None or current.project != project:
            current = Chunk(project, received_at, [], lease, position)
            out.append(current)
        current.events.append(body)  # type: ignore[attr-defined]
    return out


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (cancellation included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
