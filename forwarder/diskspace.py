"""Room on the disk buffer's file system: the reserve, what an insert costs, giving pages back.

Why these rules keep deleting possible on a full disk: docs/diskbuffer.md, "A full disk".
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence

RESERVE_NAME = "buffer.reserve"  # space given back to SQLite when the disk fills, so that acks still commit
ROW_OVERHEAD = 64  # bytes a row costs beyond its body: id, project, received_at, cell and page headers
RECLAIM_STEPS = 1000  # bounds one reclaim; each step frees up to a quarter of what is free
RECLAIM_MIN_STEP = 16  # pages


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


def reclaim(conn: sqlite3.Connection, directory: str, reserve: Reserve, checkpoint: Callable[[str], None]) -> None:
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
