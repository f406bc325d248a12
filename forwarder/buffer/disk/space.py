"""Room on the disk buffer's file system: the reserve, what an insert costs, giving pages back,
deleting when nothing else fits.

Why these rules keep deleting possible on a full disk: docs/diskbuffer.md, "A full disk".
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence

from forwarder.buffer.contract import Chunk

RESERVE_NAME = "buffer.reserve"  # space given back to SQLite when the disk fills, so that acks still commit
ROW_OVERHEAD = 64  # bytes a row costs beyond its body: id, project, received_at, cell and page headers
RECLAIM_STEPS = 1000  # bounds one reclaim; each step frees up to a quarter of what is free
RECLAIM_MIN_STEP = 16  # pages
FULL_DISK_ACKS = 500  # ids deleted per transaction on a full disk at first; halved until one fits
FULL_DISK_ATTEMPTS = 12  # 500 halved to 1 takes 8 failures, the reserve released 1 more, the 10th raises
HOLD_MARGIN = 256 * 1024  # bytes left free beside a re-taken reserve, for the WAL of the next deletes

Checkpoint = Callable[[str], bool]  # runs PRAGMA wal_checkpoint(mode); False when it could not complete
Commit = Callable[[list[int], bool], list[Chunk]]  # one transaction: delete these ids, then read or not


class DiskFull(OSError):
    """Not even deleting rows fits on the disk; the cycle is tried again later."""


def is_full(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorname", "") == "SQLITE_FULL"


def reserve_size(directory: str) -> int:
    """1/16 of the file system, between 1 and 8 MiB."""
    stat = os.statvfs(directory)
    return min(8 << 20, max(1 << 20, stat.f_blocks * stat.f_frsize // 16))


def free_bytes(directory: str) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def insert_cost(n: int, size: int) -> int:
    """Bytes inserting ``n`` events of ``size`` bytes may take: the WAL holds the new pages, then a
    checkpoint copies them into the file."""
    return 2 * (size + ROW_OVERHEAD * n)


def fitting(costs: Sequence[int], room: int) -> int:
    """How many of ``costs``, from the first, fit in ``room`` bytes."""
    n = 0
    while n < len(costs) and costs[n] <= room:
        room -= costs[n]
        n += 1
    return n


class Reserve:
    """A preallocated file whose space is given back when the disk fills."""

    def __init__(self, directory: str, size: int) -> None:
        self.path = os.path.join(directory, RESERVE_NAME)
        self.size = size

    @property
    def held(self) -> bool:
        return os.path.exists(self.path)

    def hold(self) -> bool:
        """Make sure the reserve holds its space; False when the disk has no room for it."""
        if self.held:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
            return True
        except OSError:
            self.release()
            return False

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def wal_debt(conn: sqlite3.Connection, file: str) -> int:
    """Bytes the database file must grow by before the WAL can be checkpointed.

    A checkpoint copies every page of the WAL into the file; pages past its end
    need new space, and a checkpoint that cannot write them all makes no progress
    at all (the WAL can then never be reset).
    """
    pages = conn.execute("PRAGMA page_count").fetchone()[0]  # the size the WAL says the file has
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    try:
        return max(0, pages * page_size - os.path.getsize(file))
    except FileNotFoundError:
        return 0  # displaced: nothing will be checkpointed into it


def reclaim(conn: sqlite3.Connection, directory: str, reserve: Reserve, checkpoint: Checkpoint) -> None:
    """Give the pages of deleted rows back to the file system.

    Vacuuming moves pages through the WAL, so on a full disk it goes in steps that
    fit in what is free, each checkpointed (and the file shortened) before the next.
    """
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    for _ in range(RECLAIM_STEPS):
        free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if not free_pages:
            return
        if free_bytes(directory) < RECLAIM_MIN_STEP * page_size * 2:
            reserve.release()  # moving pages needs a little room; the caller holds the reserve again
        step = min(free_pages, max(RECLAIM_MIN_STEP, free_bytes(directory) // page_size // 4))
        try:
            # executescript steps it to the end; execute() would free a single page
            conn.executescript(f"PRAGMA incremental_vacuum({step});")
        except sqlite3.OperationalError:
            return  # no room even for that yet; tried again at the next insert
        if not checkpoint("TRUNCATE"):
            return


class Space:
    """The store's room on its file system: which appends fit, and deleting when none does.

    Three rules keep a full disk from wedging the buffer (docs/diskbuffer.md, "A full disk"):
    appends count what the WAL still needs to be checkpointed (``wal_debt``) as taken;
    the reserve is taken back on every cycle, not only by appends, as soon as there is room;
    deleting on a full disk halves its transactions until one fits.
    """

    def __init__(self, directory: str, file: str, checkpoint: Checkpoint) -> None:
        self.directory = directory
        self.file = file
        self.reserve = Reserve(directory, 0)  # sized at open from the file system
        self._checkpoint = checkpoint
        self.why_full = ""  # why the last appends were refused, for /readyz

    def settle(self, conn: sqlite3.Connection) -> None:
        """Before a cycle: pay a WAL debt that grew too large, and hold the reserve again if there is room."""
        debt = wal_debt(conn, self.file)
        if debt > self.reserve.size // 2:
            # A large group commit, or a checkpoint that failed while another writer
            # held the disk: pay it now, while the reserve can still cover it.
            self._checkpoint("PASSIVE")
            debt = wal_debt(conn, self.file)
        if not self.reserve.held and free_bytes(self.directory) - debt >= self.reserve.size + HOLD_MARGIN:
            self.reserve.hold()

    def fitting(self, conn: sqlite3.Connection, costs: Sequence[int]) -> int:
        """How many appends of ``costs``, from the first, fit beside the reserve with room to checkpoint them."""
        if not costs:
            return 0
        n = fitting(costs, self._room(conn))
        if n < len(costs):
            reclaim(conn, self.directory, self.reserve, self._checkpoint)
            room = self._room(conn)
            n = fitting(costs, room)
            if n < len(costs):
                self.why_full = (f"the disk buffer's disk is full: {max(0, room)} bytes usable on {self.directory} "
                                 f"beside the {self.reserve.size}-byte reserve, the next append needs {costs[n]}")
        return n

    def _room(self, conn: sqlite3.Connection) -> int:
        if not self.reserve.held:
            self.settle(conn)
            if not self.reserve.held:
                return 0
        return free_bytes(self.directory) - wal_debt(conn, self.file)

    def commit_when_full(self, acks: list[int], read: bool, commit: Commit) -> list[Chunk]:
        """Acks and the read with no room to spare: small transactions, the WAL emptied between them.

        A transaction that does not fit is halved (deleting large rows writes a page
        per row to the WAL), down to one id; then the reserve is given back; then the
        cycle waits (``DiskFull``): acks are kept and tried again.
        """
        step, done = FULL_DISK_ACKS, 0
        for _ in range(FULL_DISK_ATTEMPTS):
            try:
                self._checkpoint("TRUNCATE")
                while done < len(acks):
                    commit(acks[done:done + step], False)
                    done += step
                    self._checkpoint("TRUNCATE")
                return commit([], read)
            except sqlite3.OperationalError as e:
                if not is_full(e):
                    raise
                if step > 1:
                    step //= 2
                elif self.reserve.held:
                    self.reserve.release()  # what the reserve is for
                else:
                    # Deleting an id twice is harmless: the caller tries every ack again later.
                    self.why_full = (f"the disk buffer's disk is full even for deleting delivered rows: "
                                     f"{free_bytes(self.directory)} bytes free on {self.directory}")
                    raise DiskFull(self.why_full) from e
        raise AssertionError("unreachable: each attempt halves the step or releases the reserve")
