"""The SQLite side of the disk buffer: one connection, used only from the buffer's own thread.

The design (schema, cycles, crash and damage handling, disk full) is in
docs/diskbuffer.md. Everything the event loop needs back comes in the return
values (``Opened``, ``Cycled``); nothing here is read from another thread.
Opening, and the files a run holds, are ``diskfiles.StoreFiles``; room on the
disk is ``diskspace.Space``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from forwarder.buffer.contract import READ_MAX_EVENTS, Chunk, Lease
from forwarder.buffer.disk.files import Connect, Opened, StoreFiles, connect, transaction
from forwarder.buffer.disk.space import Space, insert_cost, is_full

CHECKPOINT_INTERVAL = 1.0  # seconds: the backlog reaches the database file, not only the WAL


@dataclass(slots=True)
class Append:
    project: str
    received_at: float
    events: list[bytes]
    size: int  # bytes of the events, as the buffer's bounds counted them
    first_id: int = 0  # the row id of its first event, once committed: the append's id (its eventIds)


@dataclass(slots=True)
class Cycled:
    max_id: int  # highest committed id
    cursor: int  # highest id handed to the reader
    chunks: list[Chunk]
    oldest: float | None  # received_at of the oldest unread row
    appended: int  # how many of this cycle's appends, from the first, were committed; the rest were
    # refused (disk full, or the file was displaced)
    disk_full: bool
    why_full: str  # why appends are refused, for /readyz ("" when they are not)
    displaced: str  # why the file at buffer.path is no longer ours, "" while it is
    commits: int
    unsettled: bool  # the WAL holds commits the database file does not have yet
    wal_lost: str = ""  # what this cycle found and did about a WAL deleted or replaced under it


class Store:
    """The buffer's SQLite file: opening it (``StoreFiles``), cycles, dropping unread rows, closing."""

    def __init__(self, directory: str, fsync: str, connect_to: Connect = connect,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._files = StoreFiles(directory, fsync, connect_to)
        self.file = self._files.file
        self._space = Space(directory, self.file, self._checkpoint)
        self._clock = clock
        self._max_id = 0
        self._last_origin: tuple[int, str, float, int, int] | None = None  # the last row read, see _chunks
        self._cursor = 0
        self._persisted_read = 0  # meta.max_read
        self._disk_full = False
        self._displaced = ""
        self._commits = 0
        self._checkpointed = clock()
        self._unsettled = False  # commits since the last complete checkpoint
        self._wal_problem = ""  # a lost WAL that could not be checkpointed yet: appends are refused

    def open(self) -> Opened:
        """Open or create the database, moving a damaged one aside."""
        opened = self._files.open(self._space.reserve)
        self._max_id, self._persisted_read, self._cursor = opened.max_id, opened.max_read, 0
        return opened

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = self._files.conn
        assert conn is not None, "the store is open"
        return conn

    # the cycle: one transaction for everything that queued up meanwhile

    def cycle(self, appends: list[Append], acks: list[int], read: bool, idle: bool = False) -> Cycled:
        """One transaction for the appends (those that fit), the acks and the read.

        ``idle``: nothing queued for a while; the WAL is checkpointed so that a quiet
        backlog is in the database file, not only in the WAL.
        """
        wal_lost = self._check_files()
        refusing = self._displaced or self._wal_problem
        if not refusing:
            self._space.settle(self._conn)
        costs = [insert_cost(len(a.events), a.size) for a in appends]
        fitting = 0 if refusing else self._space.fitting(self._conn, costs)
        if fitting < len(appends) and not self._displaced:
            # Inserting more could leave no room to checkpoint or to delete rows:
            # the rest is refused until delivered rows give their space back.
            self._disk_full = True
        if not (appends or acks or read):
            chunks, appended = [], 0  # an idle cycle: only the checkpoint below
        elif self._disk_full and not fitting:
            chunks, appended = self._commit_when_full(acks, read), 0
        else:
            try:
                chunks = self._transaction(appends[:fitting], acks, read)
                appended = fitting
                self._disk_full = fitting < len(appends)
            except sqlite3.OperationalError as e:
                if not is_full(e):
                    raise
                # Deleting must work when inserting cannot: give SQLite the reserved
                # space back and commit the acks and the read without the appends.
                self._disk_full, appended = True, 0
                self._space.why_full = (f"the disk buffer's disk is full: a commit found no room on "
                                        f"{self._space.directory} ({e}); another writer took it")
                self._space.reserve.release()
                chunks = self._commit_when_full(acks, read)
        if appended:
            self._space.settle(self._conn)  # a large group commit is checkpointed before anyone takes the room
        due = self._clock() - self._checkpointed >= CHECKPOINT_INTERVAL
        if not self._displaced and (due or idle and self._unsettled):
            self._checkpoint("PASSIVE")
        why = self._wal_problem or self._space.why_full
        return Cycled(self._max_id, self._cursor, chunks, self._oldest_unread(), appended, self._disk_full,
                      why if self._disk_full else "", self._displaced, self._commits, self._unsettled, wal_lost)

    def _check_files(self) -> str:
        """Before committing anything: is the file ours, are its WAL and shared memory the ones SQLite writes?

        Returns what was found about a lost WAL, for the log ("" when nothing).
        """
        if not self._displaced:
            self._displaced = self._files.displaced()
        if self._displaced:
            return ""
        if self._files.conn is None:  # the last reconnect failed: its checkpoint was complete
            self._files.reconnect()  # raises again while it cannot: the cycle fails, its acks are kept
            self._wal_problem = ""
            return ""
        lost = self._files.wal_lost()
        if not lost:
            return ""
        # The connection still reads the old WAL: copy it into the database file,
        # then start a new one. Until then nothing is acknowledged into a file
        # that a restart would not find. The old connection is closed first: closing
        # deletes the WAL and shared memory by name, which must not be the new ones.
        if self._checkpoint("TRUNCATE"):
            self._files.reconnect()
            self._wal_problem = ""
            return f"{lost}; its commits were copied into the database file and a new WAL was started: nothing lost"
        self._wal_problem = (f"the disk buffer refuses appends: {lost}, and its commits could not be "
                             f"copied into the database file yet")
        return self._wal_problem

    def _commit_when_full(self, acks: list[int], read: bool) -> list[Chunk]:
        return self._space.commit_when_full(acks, read, partial(self._transaction, []))

    def _transaction(self, appends: list[Append], acks: list[int], read: bool) -> list[Chunk]:
        conn = self._conn
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
                chunks, self._last_origin = _chunks(rows, self._last_origin)
                # A short read saw every committed row: the cursor also skips
                # the ids of rows dropped meanwhile.
                cursor = rows[-1][0] if len(rows) == READ_MAX_EVENTS else max_id
                if cursor > self._persisted_read:
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'max_read'", (cursor,))
        self._commits += 1
        self._unsettled = True
        self._max_id, self._cursor = max_id, cursor
        self._persisted_read = max(self._persisted_read, cursor)
        if appends:
            self._files.write_ledger(max_id)
        return chunks

    def _oldest_unread(self) -> float | None:
        row = self._conn.execute("SELECT received_at FROM events WHERE id > ? ORDER BY id LIMIT 1",
                                 (self._cursor,)).fetchone()
        return None if row is None else row[0]

    def drop_unread(self, events: int, nbytes: int) -> tuple[int, int, float | None]:
        """Delete the oldest unread rows until ``events`` and ``nbytes`` are freed; all or nothing.

        Returns (events freed, bytes freed, received_at of the oldest unread row left).
        """
        conn = self._conn
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
        self._unsettled = True
        return freed_events, freed_bytes, self._oldest_unread()

    def _checkpoint(self, mode: str) -> bool:
        """Copy the WAL into the database file; False when it could not complete.

        A checkpoint that needs the file to grow and finds no room fails whole
        (SQLITE_FULL): the reserve is given back for it, since a WAL that can never
        be checkpointed would never be reset and would keep growing.
        """
        self._checkpointed = self._clock()
        for attempt in range(2):
            try:
                busy, log, done = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
                complete = not busy and log == done
                self._unsettled = self._unsettled and not complete
                return complete
            except sqlite3.OperationalError as e:
                if not is_full(e) or attempt or not self._space.reserve.held:
                    return False  # the WAL keeps the data; the next cycle tries again
                self._space.reserve.release()
        return False

    def close(self) -> None:
        try:
            if self._files.conn is not None and not self._displaced:
                self._checkpoint("TRUNCATE")
        finally:
            self._files.close()


def _rows(appends: list[Append], first_id: int) -> Iterator[tuple[int, str, float, bytes]]:
    row_id = first_id
    for a in appends:
        project, received_at = a.project, a.received_at
        a.first_id = row_id
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


def _chunks(rows: list[tuple[int, str, float, bytes]], last: tuple[int, str, float, int, int] | None
            ) -> tuple[list[Chunk], tuple[int, str, float, int, int] | None]:
    """Consecutive rows of one project become one chunk (dated by its oldest row), all under one lease.

    The lease's origins say which append each row came from (for eventIds): an
    append is a run of consecutive ids of one project and receipt time; ``last``
    (id, project, received_at, append id, index) of the previous read's last row
    continues an append that two reads split. Returns the chunks and this read's last.
    """
    if not rows:
        return [], last
    origins: list[tuple[int, int, int]] = []
    lease = Lease((len(row[3]) for row in rows), [row[0] for row in rows], origins)
    out: list[Chunk] = []
    current: Chunk | None = None
    prev_id, prev_project, prev_at = (last[0], last[1], last[2]) if last is not None else (-1, None, None)
    if last is not None and (rows[0][0], rows[0][1], rows[0][2]) == (prev_id + 1, prev_project, prev_at):
        origins.append((0, last[3], last[4] + 1))
    for position, (row_id, project, received_at, body) in enumerate(rows):
        if row_id != prev_id + 1 or project != prev_project or received_at != prev_at:
            origins.append((position, row_id, 0))
        prev_id, prev_project, prev_at = row_id, project, received_at
        if current is None or current.project != project:
            current = Chunk(project, received_at, [], lease, position)
            out.append(current)
        current.events.append(body)  # type: ignore[attr-defined]
    first, append_id, index = origins[-1]
    return out, (prev_id, prev_project, prev_at, append_id, index + len(rows) - 1 - first)  # type: ignore[return-value]
