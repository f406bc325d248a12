"""The disk buffer's files: opened together at start, checked, held until the store closes.

The directory's lock, the database (its schema checked, moved aside when
damaged), the ledger compared with what the file holds. Used only from the
buffer's own thread. Why each check is there: docs/diskbuffer.md, "Damage
found at start".
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from forwarder.buffer.disk.ledger import Ledger, Recorded
from forwarder.buffer.disk.space import Reserve, reserve_size

SCHEMA_VERSION = 1
DB_NAME = "buffer.sqlite3"
WAL_SIZE_LIMIT = 4 * 1024 * 1024  # bytes the WAL file is truncated to after a checkpoint
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
_WAL_FILES = ("-wal", "-shm")

Connect = Callable[[str], sqlite3.Connection]


def connect(file: str) -> sqlite3.Connection:
    return sqlite3.connect(file, isolation_level=None)


class Damaged(Exception):
    """The database file is not a buffer this version can use."""


@dataclass(slots=True)
class Opened:
    rows: int
    nbytes: int
    max_id: int  # ids of new rows start above it
    max_read: int  # rows up to this id were handed to a previous run's sender
    damage: str = ""  # what was wrong with the files found, "" when nothing
    moved_to: str = ""  # where a damaged file went, "" when it stayed
    lost: int = 0  # at most this many committed events were not in the file (damage says why)
    ledger_problem: str = ""  # a copy of the ledger missing or garbled, with nothing found lost


class StoreFiles:
    """The files one run holds: the directory's lock, the database's connection, the ledger.

    ``close`` releases whatever ``open`` took, also after a failed open.
    """

    def __init__(self, directory: str, fsync: str, connect_to: Connect) -> None:
        self.directory = directory
        self.file = os.path.join(directory, DB_NAME)
        self._synchronous = "FULL" if fsync == "always" else "NORMAL"
        self._connect_to = connect_to
        self.conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._ledger = Ledger(directory, self.file)
        self._identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file this run opened
        self._wal_identity: dict[str, tuple[int, int]] = {}  # the same for the -wal and -shm SQLite writes
        self._reserve_size = 0

    def open(self, reserve: Reserve) -> Opened:
        os.makedirs(self.directory, exist_ok=True)
        self._lock_fd = lock_directory(self.directory)
        reserve.size = reserve_size(self.directory)
        recorded = self._ledger.read()
        try:
            opened = self._connect(reserve.size)
        except Damaged as e:
            opened = self._replace(str(e), reserve.size)
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorname", "") not in _DAMAGE:
                self._close_connection()
                raise OSError(f"buffer.path: cannot open {self.file}: {e}") from e
            opened = self._replace(f"{e} ({e.sqlite_errorname})", reserve.size)
        self._compare(recorded, opened)
        opened.max_id = max(opened.max_id, recorded.max_id)
        self._ledger.open(opened.max_id)
        reserve.hold()
        return opened

    def _compare(self, recorded: Recorded, opened: Opened) -> None:
        """What the ledger says against what the file holds: rows lost since the last run, or a damaged ledger."""
        copies = f" ({'; '.join(recorded.problems)})" if recorded.problems else ""
        if recorded.max_id > opened.max_id and not opened.damage:
            # Rows the last run committed are not in the file: it was truncated, or
            # its WAL deleted or overwritten, after the process stopped.
            opened.lost = recorded.max_id - opened.max_id
            opened.damage = (f"up to {opened.lost} events are lost: the last run committed rows up to id "
                             f"{recorded.max_id}, the file holds ids up to {opened.max_id}; rows committed since "
                             f"its last checkpoint went with a deleted or overwritten WAL or a truncated file{copies}")
        elif recorded.problems and opened.max_id and not opened.damage:
            opened.ledger_problem = "; ".join(recorded.problems) + (
                "" if self._ledger.xattrs else
                f"; {self.directory} keeps no extended attributes, so rows lost since the last run cannot be told")

    def _replace(self, damage: str, reserve_size: int) -> Opened:
        self._close_connection()
        moved_to = move_aside(self.file)
        opened = self._connect(reserve_size)
        opened.damage, opened.moved_to = damage, moved_to
        return opened

    def _connect(self, reserve_size: int) -> Opened:
        # Created owner-only before SQLite opens it (SQLite would use 0644 less the umask);
        # SQLite gives the -wal and -shm files the database file's mode.
        os.close(os.open(self.file, os.O_RDWR | os.O_CREAT, 0o600))
        conn = self.conn = self._connect_to(self.file)
        # Checked before anything is written, so a file moved aside is left as it was found.
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise Damaged("quick_check: " + "; ".join(problems[:3]))
        fresh = check_schema(conn)
        self._configure(conn, reserve_size)
        if fresh:
            # Incremental vacuum lets a full disk get back the pages of delivered rows.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            with transaction(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
        self._identity = _identity(self.file)
        rows, nbytes, max_id = conn.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0), coalesce(max(id), 0) FROM events").fetchone()
        if rows == 0 and conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # a file from an older version, empty: cheap to convert
            conn.execute("VACUUM")
        max_read = conn.execute("SELECT value FROM meta WHERE key = 'max_read'").fetchone()[0]
        # Ids keep growing past max_read even if every row was deleted, so a
        # new row is never mistaken for one the previous run had sent.
        return Opened(rows, nbytes, max(max_id, max_read), max_read)

    def _configure(self, conn: sqlite3.Connection, reserve_size: int) -> None:
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise OSError(f"{self.file}: SQLite cannot use WAL mode on this file system")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        # The pages a checkpoint may add to the file stay well inside the reserve,
        # so a checkpoint after the disk filled always has room to complete.
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint={max(16, reserve_size // page_size // 4)}")
        self._reserve_size = reserve_size
        conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # a read: SQLite opens the WAL and shared memory
        self._wal_identity = {suffix: _identity(self.file + suffix) for suffix in _WAL_FILES}

    def wal_lost(self) -> str:
        """Why the WAL or shared-memory file SQLite writes is no longer the one at its path, or ""."""
        for suffix in _WAL_FILES:
            path = self.file + suffix
            try:
                now = _identity(path)
            except FileNotFoundError:
                return f"{path} was deleted while the forwarder was running"
            if now != self._wal_identity.get(suffix):
                return f"{path} was replaced by another file while the forwarder was running"
        return ""

    def reconnect(self) -> None:
        """A new connection, with a new WAL and shared memory at their paths (after a complete checkpoint)."""
        self._close_connection()
        conn = self.conn = self._connect_to(self.file)
        self._configure(conn, self._reserve_size)

    def write_ledger(self, max_id: int) -> None:
        self._ledger.write(max_id)

    def displaced(self) -> str:
        """Why the file at buffer.path is no longer the one this run holds, or ""."""
        try:
            stat = os.stat(self.file)
        except FileNotFoundError:
            return f"{self.file} was deleted while the forwarder was running"
        if (stat.st_dev, stat.st_ino) != self._identity:
            return f"{self.file} was replaced by another file while the forwarder was running"
        return ""

    def close(self) -> None:
        self._close_connection()
        self._ledger.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with its descriptor
        self._lock_fd = None

    def _close_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


def _identity(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


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
