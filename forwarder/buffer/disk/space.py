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
FULL_DISK_ACKS = 500  # ids deleted per transaction on a full disk, so that each fits in what the reserve left

Checkpoint = Callable[[str], None]  # runs PRAGMA wal_checkpoint(mode), tolerating a full disk
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
        checkpoint("TRUNCATE")


class Space:
    """The store's room on its file system: which appends fit, and deleting when none does."""

    def __init__(self, directory: str, file: str, checkpoint: Checkpoint) -> None:
        self.directory = directory
        self.file = file
        self.reserve = Reserve(directory, 0)  # sized at open from the file system
        self._checkpoint = checkpoint

    def fitting(self, conn: sqlite3.Connection, costs: Sequence[int]) -> int:
        """How many appends of ``costs``, from the first, fit beside the reserve with room to checkpoint them."""
        if not costs:
            return 0
        n = fitting(costs, self._room())
        if n < len(costs):
            reclaim(conn, self.directory, self.reserve, self._checkpoint)
            n = fitting(costs, self._room())
        return n

    def _room(self) -> int:
        return free_bytes(self.directory) if self.reserve.hold() else 0

    def commit_when_full(self, acks: list[int], read: bool, commit: Commit) -> list[Chunk]:
        """Acks and the read with no room to spare: small transactions, the WAL emptied between them."""
        for attempt in range(2):
            try:
                self._checkpoint("TRUNCATE")
                for i in range(0, len(acks), FULL_DISK_ACKS):
                    commit(acks[i:i + FULL_DISK_ACKS], False)
                    self._checkpoint("TRUNCATE")
                return commit([], read)
            except sqlite3.OperationalError as e:
                if not is_full(e):
                    raise
                if attempt == 1 or not self.reserve.held:
                    # Deleting an id twice is harmless: the caller tries every ack again later.
                    raise DiskFull(f"{self.file}: the disk is full even for deleting delivered rows") from e
                self.reserve.release()  # what the reserve is for
        raise AssertionError("unreachable")
