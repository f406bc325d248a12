"""The SQLite disk buffer, in process: commits, group commit, reads, acks, bounds, recovery, damage."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import structlog

from forwarder.buffer.contract import READ_MAX_EVENTS, BufferFull
from forwarder.config import BufferConfig
from forwarder.buffer.disk.buffer import DB_NAME, BufferDisplaced, DiskBuffer, Progress
from forwarder.buffer.disk.space import ROW_OVERHEAD, DiskFull, fitting, free_bytes, insert_cost, wal_debt
from forwarder.buffer.disk.store import Append, Cycled, Store, _ranges, connect
from forwarder.observability import Observer
from tests.fakes import FakeClock
from forwarder.emulator.harness import wait_for
from tests import support


def events(prefix: str, n: int, size: int = 20) -> list[bytes]:
    return [f"{prefix}-{i}".encode().ljust(size, b".") for i in range(n)]


def rows_on_disk(directory: Path) -> list[tuple[int, str, bytes]]:
    """What another process would see: a separate connection to the same file."""
    conn = sqlite3.connect(directory / DB_NAME)
    try:
        return conn.execute("SELECT id, project, body FROM events ORDER BY id").fetchall()
    finally:
        conn.close()


def sample(observer: Observer, name: str, labels: dict[str, str] | None = None) -> float:
    return observer.metrics.registry.get_sample_value(name, labels or {}) or 0.0


class Buffers:
    """Opens disk buffers on a directory and closes them all at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.open_buffers: list[DiskBuffer] = []

    async def open(self, path: Path | None = None, connect_to=connect, clock=time.monotonic,
                   on_crash=None, settle_after: float = 1.0, **config) -> tuple[DiskBuffer, Observer, int]:
        observer = support.observer()
        buf = DiskBuffer(BufferConfig(type="disk", path=str(path or self.path), **config), observer, connect_to, clock,
                         settle_after)
        recovered = await buf.open(on_crash)
        self.open_buffers.append(buf)
        return buf, observer, recovered


@pytest.fixture
async def buffers(tmp_path: Path):
    b = Buffers(tmp_path / "buffer")
    yield b
    for buf in b.open_buffers:
        await buf.close()


async def read_all(buf: DiskBuffer) -> list:
    out = []
    while chunks := await buf.read(0):
        out.extend(chunks)
    return out


# committing


@pytest.mark.parametrize("fsync", ["normal", "always"])
async def test_append_returns_only_after_its_rows_are_committed(buffers, fsync):
    buf, _, _ = await buffers.open(fsync=fsync)
    await buf.append("p1", events("a", 3), 100.0)
    assert [(p, body) for _, p, body in rows_on_disk(buffers.path)] == [("p1", e) for e in events("a", 3)]
    assert (buf.depth, buf.nbytes) == (3, 60)


async def test_concurrent_appends_are_committed_in_fewer_transactions_than_requests(buffers):
    buf, _, _ = await buffers.open()
    before = buf.commits
    await asyncio.gather(*(buf.append("p1", events(f"r{i}", 10), 100.0) for i in range(50)))
    assert len(rows_on_disk(buffers.path)) == 500
    assert 1 <= buf.commits - before < 50


# reading


async def test_read_returns_rows_in_id_order_grouped_into_same_project_runs(buffers):
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("a", 2), 100.0)
    await buf.append("p2", events("b", 1), 101.0)
    await buf.append("p1", events("c", 2), 102.0)
    chunks = await buf.read(0)
    assert [(c.project, c.received_at, c.events) for c in chunks] == [
        ("p1", 100.0, events("a", 2)), ("p2", 101.0, events("b", 1)), ("p1", 102.0, events("c", 2))]
    assert len({id(c.lease) for c in chunks}) == 1  # one read, one lease
    ids = list(chunks[0].lease.ids)
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert await buf.read(0) == []


async def test_consecutive_appends_of_one_project_come_back_as_one_chunk_dated_by_the_oldest(buffers):
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("a", 2), 100.0)
    await buf.append("p1", events("b", 2), 105.0)
    [chunk] = await buf.read(0)
    assert (chunk.received_at, chunk.events) == (100.0, events("a", 2) + events("b", 2))


async def test_one_read_returns_at_most_read_max_events_and_the_next_read_continues(buffers):
    buf, _, _ = await buffers.open(max_events=READ_MAX_EVENTS * 2)
    for i in range(6):
        await buf.append("p1", events(f"r{i}", 1000, 10), 100.0)
    first = await buf.read(0)
    second = await buf.read(0)
    assert sum(len(c.events) for c in first) == READ_MAX_EVENTS
    assert sum(len(c.events) for c in second) == 6000 - READ_MAX_EVENTS
    assert first[-1].lease.ids[-1] < second[0].lease.ids[0]


async def test_read_times_out_empty_and_a_waiting_reader_is_woken_by_an_append(buffers):
    buf, _, _ = await buffers.open()
    assert await buf.read(0.05) == []
    reader = asyncio.create_task(buf.read(None))
    await asyncio.sleep(0)
    assert not reader.done()
    await buf.append("p1", events("a", 1), 100.0)
    chunks = await asyncio.wait_for(reader, 5)
    assert chunks[0].events == events("a", 1)


async def test_oldest_unread_is_the_first_unread_rows_receive_time(buffers):
    buf, _, _ = await buffers.open()
    assert buf.oldest_unread() is None
    await buf.append("p1", events("a", 1), 100.0)
    await buf.append("p1", events("b", 1), 200.0)
    assert buf.oldest_unread() == 100.0
    await buf.read(0)
    assert buf.oldest_unread() is None


async def test_stop_reading_wakes_a_waiting_reader_with_nothing(buffers):
    buf, _, _ = await buffers.open()
    waiting = asyncio.create_task(buf.read(None))
    await asyncio.sleep(0)
    buf.stop_reading()
    assert await asyncio.wait_for(waiting, 5) == []


async def test_after_stop_reading_unread_rows_stay_on_disk_for_the_next_start(buffers):
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("a", 3), 100.0)
    buf.stop_reading()
    assert await buf.read(None) == []
    assert buf.depth == 3
    await buf.close()
    again, _, recovered = await buffers.open()
    assert recovered == 3
    assert [e for c in await again.read(0) for e in c.events] == events("a", 3)


# acknowledging


async def test_ack_lowers_depth_at_once_and_deletes_exactly_the_acked_rows(buffers):
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("a", 5, size=10), 100.0)
    [chunk] = await buf.read(0)
    acked = [0, 2, 4]  # not consecutive: the rows between must stay
    await buf.ack(support.receipt(chunk).subset(acked))
    assert (buf.depth, buf.nbytes) == (2, 20)
    await buf.close()
    assert [body for _, _, body in rows_on_disk(buffers.path)] == [chunk.events[1], chunk.events[3]]


async def test_acks_are_deleted_without_waiting_for_close(buffers):
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("a", 4), 100.0)
    [chunk] = await buf.read(0)
    await buf.ack(support.receipt(chunk))

    async def deleted() -> bool:
        return rows_on_disk(buffers.path) == []
    await wait_for(deleted, 5, "the acked rows to be deleted")


@pytest.mark.parametrize("ids, ranges", [
    ([7], [(7, 7)]),
    ([3, 1, 2], [(1, 3)]),
    ([1, 2, 4, 5, 9], [(1, 2), (4, 5), (9, 9)]),
])
def test_acked_ids_are_deleted_in_runs_of_consecutive_ids(ids, ranges):
    assert _ranges(ids) == ranges


class FailingOnce(sqlite3.Connection):
    """A connection whose next INSERT fails once with ``error``, as a flaky disk would make it."""

    error: sqlite3.Error | None = None

    def executemany(self, sql, rows):
        if sql.startswith("INSERT") and FailingOnce.error is not None:
            error, FailingOnce.error = FailingOnce.error, None
            raise error
        return super().executemany(sql, rows)


def failing_connect(file: str) -> sqlite3.Connection:
    return sqlite3.connect(file, isolation_level=None, factory=FailingOnce)


async def test_a_failed_commit_fails_its_appends_but_keeps_its_acks(buffers):
    buf, _, _ = await buffers.open(connect_to=failing_connect)
    await buf.append("p1", events("a", 2), 100.0)
    [chunk] = await buf.read(0)
    await buf.ack(support.receipt(chunk))
    FailingOnce.error = sqlite3.OperationalError("disk I/O error")
    with pytest.raises(sqlite3.OperationalError):
        await buf.append("p1", events("b", 1), 100.0)
    await buf.append("p1", events("c", 1), 100.0)
    assert buf.depth == 1
    assert [body for _, _, body in rows_on_disk(buffers.path)] == events("c", 1)


def capped(pages: int):
    """Connections whose database may not grow past ``pages`` pages: SQLite's own SQLITE_FULL."""
    def connect_to(file: str) -> sqlite3.Connection:
        conn = sqlite3.connect(file, isolation_level=None)
        conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn
    return connect_to


async def fill(buf: DiskBuffer) -> int:
    """Append until the disk refuses; returns how many events went in."""
    n = 0
    while True:
        try:
            await buf.append("p1", events(f"f{n}", 50, size=200), 100.0)
        except BufferFull as e:
            assert e.retry_after > 1.0  # a full disk is not a full buffer: a longer wait
            return n
        n += 50


async def test_a_full_disk_refuses_appends_but_still_commits_acks_and_reads(buffers):
    clock = FakeClock(0.0)
    buf, observer, _ = await buffers.open(connect_to=capped(40), clock=clock, max_events=1_000_000)
    stored = await fill(buf)
    assert stored > 0 and buf.problem.startswith("the disk buffer's disk is full: ")
    assert buf.depth == stored  # the refused events were never counted
    chunks = await read_all(buf)  # reading works on a full disk...
    assert sum(len(c.events) for c in chunks) == stored
    for chunk in chunks:
        await buf.ack(support.receipt(chunk))  # ...and so does deleting

    async def deleted() -> bool:
        return rows_on_disk(buffers.path) == []
    await wait_for(deleted, 5, "the acknowledged rows to be deleted on a full disk")
    assert buf.depth == 0


async def test_appends_resume_by_themselves_once_the_disk_has_room_again(buffers):
    clock = FakeClock(0.0)
    buf, _, _ = await buffers.open(connect_to=capped(40), clock=clock, max_events=1_000_000)
    await fill(buf)
    for chunk in await read_all(buf):
        await buf.ack(support.receipt(chunk))
    with pytest.raises(BufferFull):  # refused at once while the disk counts as full
        await buf.append("p1", events("x", 1), 100.0)
    clock.advance(1.5)  # past DISK_FULL_RETRY: the next append tries the disk again

    async def accepted() -> bool:
        try:
            await buf.append("p1", events("after", 10), 101.0)
            return True
        except BufferFull:
            clock.advance(1.5)  # the deletes may not have reached the file yet
            return False
    await wait_for(accepted, 10, "an append to succeed once the acknowledged rows freed their pages")
    assert buf.problem is None
    assert [e for c in await buf.read(0) for e in c.events] == events("after", 10)


# bounds


async def test_a_full_buffer_rejects_the_whole_request_and_readiness_returns_below_ninety_percent(buffers):
    buf, _, _ = await buffers.open(max_events=20)
    await buf.append("p1", events("a", 16), 100.0)
    with pytest.raises(BufferFull):
        await buf.append("p1", events("b", 5), 100.0)
    assert (buf.depth, buf.full) == (16, True)
    assert len(rows_on_disk(buffers.path)) == 16
    await buf.append("p1", events("c", 4), 100.0)
    [chunk] = await buf.read(0)
    await buf.ack(support.receipt(chunk, 0, 1))
    assert buf.full  # 19 of 20: still above the hysteresis line
    await buf.ack(support.receipt(chunk, 1, 2))
    assert not buf.full  # 18 of 20


async def test_the_byte_bound_rejects_too(buffers):
    buf, _, _ = await buffers.open(max_bytes=1024)
    await buf.append("p1", events("a", 10, size=100), 100.0)
    with pytest.raises(BufferFull):
        await buf.append("p1", events("b", 1, size=100), 100.0)


async def test_drop_oldest_deletes_the_oldest_unread_rows_and_never_the_ones_in_flight(buffers):
    buf, observer, _ = await buffers.open(max_events=10, when_full="drop_oldest")
    await buf.append("p1", events("sent", 4), 100.0)
    [in_flight] = await buf.read(0)
    await buf.append("p1", events("old", 6), 101.0)
    await buf.append("p1", events("new", 3), 102.0)
    assert sample(observer, "forwarder_events_dropped_total", {"reason": "buffer_full"}) == 3
    assert buf.depth == 10
    unread = [e for c in await buf.read(0) for e in c.events]
    assert unread == events("old", 6)[3:] + events("new", 3)
    on_disk = [body for _, _, body in rows_on_disk(buffers.path)]
    assert on_disk[:4] == in_flight.events


async def test_drop_oldest_rejects_without_dropping_when_unread_rows_cannot_make_room(buffers):
    buf, observer, _ = await buffers.open(max_events=10, when_full="drop_oldest")
    await buf.append("p1", events("sent", 8), 100.0)
    await buf.read(0)
    await buf.append("p1", events("old", 1), 101.0)
    with pytest.raises(BufferFull):
        await buf.append("p1", events("new", 3), 102.0)
    assert sample(observer, "forwarder_events_dropped_total", {"reason": "buffer_full"}) == 0
    assert len(rows_on_disk(buffers.path)) == 9


# recovery


async def test_reopening_recovers_pending_rows_and_reads_them_first(buffers):
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("a", 3, size=10), 100.0)
    [chunk] = await buf.read(0)
    await buf.ack(support.receipt(chunk, 0, 1))
    await buf.append("p2", events("b", 2, size=10), 101.0)
    await buf.close()

    again, observer, recovered = await buffers.open()
    assert recovered == 4
    assert (again.depth, again.nbytes) == (4, 40)
    await again.append("p1", events("c", 1, size=10), 102.0)
    chunks = await read_all(again)
    assert [(c.project, c.events) for c in chunks] == [
        ("p1", chunk.events[1:]), ("p2", events("b", 2, size=10)), ("p1", events("c", 1, size=10))]
    # Only the two rows the first run had handed to its sender may have been sent before.
    assert sample(observer, "forwarder_duplicates_total") == 2


async def test_a_kill_leaves_every_committed_row_for_the_next_start(buffers, tmp_path):
    buf, _, _ = await buffers.open()
    await asyncio.gather(*(buf.append("p1", events(f"r{i}", 10), 100.0) for i in range(20)))
    # The files as they are now, without close (no checkpoint): what kill -9 leaves.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal"):
        shutil.copy(buffers.path / (DB_NAME + suffix), crashed / (DB_NAME + suffix))
    after, _, recovered = await buffers.open(crashed)
    assert recovered == 200
    assert len([e for c in await read_all(after) for e in c.events]) == 200


async def test_new_rows_after_a_restart_are_not_counted_as_duplicates(buffers):
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("a", 3), 100.0)
    [chunk] = await buf.read(0)
    await buf.ack(support.receipt(chunk))
    await buf.close()
    again, observer, recovered = await buffers.open()
    await again.append("p1", events("b", 2), 101.0)
    [fresh] = await again.read(0)
    assert recovered == 0
    assert min(fresh.lease.ids) > max(chunk.lease.ids)
    assert sample(observer, "forwarder_duplicates_total") == 0


# damage


def write_garbage(path: Path) -> None:
    path.mkdir(parents=True)
    (path / DB_NAME).write_bytes(b"this is not a database, it is garbage " * 300)


async def truncate_a_real_buffer(path: Path) -> None:
    buf = DiskBuffer(BufferConfig(type="disk", path=str(path)), support.observer())
    await buf.open()
    for i in range(10):
        await buf.append("p1", events(f"r{i}", 300, size=200), 100.0)
    await buf.close()
    db = path / DB_NAME
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)


def write_foreign_schema(path: Path) -> None:
    path.mkdir(parents=True)
    conn = sqlite3.connect(path / DB_NAME)
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, payload TEXT)")
    conn.execute("INSERT INTO events (payload) VALUES ('x')")
    conn.commit()
    conn.close()


def write_future_version(path: Path) -> None:
    path.mkdir(parents=True)
    conn = sqlite3.connect(path / DB_NAME)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, project TEXT NOT NULL, "
                 "received_at REAL NOT NULL, body BLOB NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', 99), ('max_read', 0)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign schema", "future schema version"])
async def test_a_damaged_database_is_moved_aside_reported_and_replaced_by_an_empty_one(buffers, damage):
    path = buffers.path
    if damage == "garbage":
        write_garbage(path)
    elif damage == "truncated":
        await truncate_a_real_buffer(path)
    elif damage == "foreign schema":
        write_foreign_schema(path)
    else:
        write_future_version(path)
    original = (path / DB_NAME).read_bytes()

    buf, observer, recovered = await buffers.open()

    assert recovered == 0 and buf.depth == 0
    assert sample(observer, "forwarder_buffer_corruptions_total") == 1
    [moved] = path.glob(DB_NAME + ".corrupt-*[!lm]")  # the main file, not its -wal/-shm
    assert moved.read_bytes() == original
    await buf.append("p1", events("a", 2), 100.0)
    assert [e for c in await buf.read(0) for e in c.events] == events("a", 2)


async def test_a_second_forwarder_cannot_open_a_buffer_in_use_whatever_files_were_deleted(buffers):
    await buffers.open()
    for leftover in buffers.path.iterdir():  # a cleanup script that deletes what it does not know
        if leftover.name != DB_NAME:
            leftover.unlink()
    second = DiskBuffer(BufferConfig(type="disk", path=str(buffers.path)),
                        support.observer())
    with pytest.raises(OSError, match="in use by another forwarder"):
        await second.open()
    await second.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_database_displaced_under_a_running_buffer_stops_new_appends_and_drains_the_old_file(buffers, how):
    crashes: list[BaseException] = []
    buf, _, _ = await buffers.open(on_crash=crashes.append)
    await buf.append("p1", events("kept", 3), 100.0)
    (buffers.path / DB_NAME).unlink()
    if how == "replaced":
        sqlite3.connect(buffers.path / DB_NAME).close()  # e.g. a restored backup
    with pytest.raises(BufferDisplaced):  # never acknowledged into a file nobody will find
        await buf.append("p1", events("new", 1), 100.0)
    assert buf.problem and [type(e) for e in crashes] == [BufferDisplaced]
    chunks = await buf.read(0)  # what the old file holds can still be delivered
    assert [e for c in chunks for e in c.events] == events("kept", 3)
    with pytest.raises(BufferDisplaced):
        await buf.append("p1", events("later", 1), 100.0)


def copy_files(src: Path, dst: Path) -> None:
    """The files as they are now, without close: what kill -9 leaves (extended attributes included)."""
    dst.mkdir()
    for name in (DB_NAME, DB_NAME + "-wal", "buffer.ledger"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


@pytest.mark.parametrize("ledger", ["intact", "deleted", "garbled"])
@pytest.mark.parametrize("damage", ["database truncated to 0 bytes", "WAL deleted", "WAL overwritten"])
async def test_rows_lost_between_runs_are_reported_as_a_corruption_with_how_many(buffers, tmp_path, damage, ledger):
    # Issue 21, item 5: with buffer.ledger deleted or garbled too, the loss went unreported.
    buf, _, _ = await buffers.open()
    for i in range(10):
        await buf.append("p1", events(f"r{i}", 100), 100.0)
    crashed = tmp_path / "crashed"
    copy_files(buffers.path, crashed)
    if damage == "database truncated to 0 bytes":
        with open(crashed / DB_NAME, "r+b") as f:
            f.truncate(0)
        (crashed / (DB_NAME + "-wal")).unlink()
    elif damage == "WAL deleted":
        (crashed / (DB_NAME + "-wal")).unlink()
    else:
        wal = crashed / (DB_NAME + "-wal")
        wal.write_bytes(b"\0" * wal.stat().st_size)
    if ledger == "deleted":
        (crashed / "buffer.ledger").unlink()
    elif ledger == "garbled":
        (crashed / "buffer.ledger").write_bytes(b"\x00garbage" * 5)
    with structlog.testing.capture_logs() as logs:
        after, observer, recovered = await buffers.open(crashed)
    assert recovered < 1000
    assert sample(observer, "forwarder_buffer_corruptions_total") == 1
    [reported] = [e for e in logs if e["event"] == "buffer_corrupted"]
    assert f"up to {1000 - recovered} events are lost" in reported["error"]
    await after.append("p1", events("new", 1), 101.0)  # new ids continue above what was lost
    [chunk] = await after.read(0)
    assert chunk.lease.ids[-1] > 1000


async def test_a_garbled_ledger_with_nothing_lost_is_reported_and_written_afresh(buffers, tmp_path):
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("a", 10), 100.0)
    crashed = tmp_path / "crashed"
    copy_files(buffers.path, crashed)
    (crashed / "buffer.ledger").write_bytes(b"not a number at all, and longer than one")
    with structlog.testing.capture_logs() as logs:
        after, observer, recovered = await buffers.open(crashed)
    assert recovered == 10
    assert sample(observer, "forwarder_buffer_corruptions_total") == 0
    [warned] = [e for e in logs if e["event"] == "buffer_ledger_damaged"]
    assert "buffer.ledger was garbled" in warned["problem"]
    assert (crashed / "buffer.ledger").read_bytes() == b"%020d\n" % 10


async def test_a_backlog_reaches_the_database_file_by_the_next_checkpoint_not_only_the_wal(buffers, tmp_path):
    clock = FakeClock(0.0)
    buf, _, _ = await buffers.open(clock=clock)
    await buf.append("p1", events("a", 100), 100.0)
    clock.advance(1.5)  # past CHECKPOINT_INTERVAL: the next cycle checkpoints
    await buf.append("p1", events("b", 1), 100.0)
    crashed = tmp_path / "crashed"
    copy_files(buffers.path, crashed)
    (crashed / (DB_NAME + "-wal")).unlink()  # the worst case: the WAL is gone
    after, _, recovered = await buffers.open(crashed)
    assert recovered >= 100


async def test_a_quiet_backlog_is_checkpointed_into_the_database_file_once_the_buffer_is_idle(buffers, tmp_path):
    # Issue 21, item 5: without commits, nothing checkpointed; 1,000 events sat in the WAL alone.
    buf, _, _ = await buffers.open(clock=FakeClock(0.0), settle_after=0.05)
    await buf.append("p1", events("a", 1000), 100.0)

    async def in_the_file_alone() -> bool:
        crashed = tmp_path / f"crashed-{time.monotonic_ns()}"
        crashed.mkdir()
        shutil.copy(buffers.path / DB_NAME, crashed / DB_NAME)  # the WAL is not copied
        try:
            return len(rows_on_disk(crashed)) == 1000
        except sqlite3.DatabaseError:  # not even the schema in the file yet, or copied mid-checkpoint
            return False
    await wait_for(in_the_file_alone, 5, "the idle backlog to be checkpointed into the database file")


@pytest.mark.parametrize("lost", ["-wal deleted", "-shm deleted", "-wal replaced"])
async def test_a_wal_lost_under_a_running_buffer_is_noticed_before_the_next_commit_and_nothing_is_lost(
        buffers, tmp_path, lost):
    # Issue 21, item 5: the WAL deleted while running went unnoticed; what was committed
    # afterwards went to a file nobody could find, and a kill -9 lost all of it.
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("before", 200), 100.0)
    suffix = lost.split()[0]
    (buffers.path / (DB_NAME + suffix)).unlink()
    if lost.endswith("replaced"):
        (buffers.path / (DB_NAME + suffix)).write_bytes(b"")
    with structlog.testing.capture_logs() as logs:
        await buf.append("p1", events("after", 100), 100.0)
    [reported] = [e for e in logs if e["event"] == "buffer_wal_lost"]
    assert suffix in reported["reason"] and "nothing lost" in reported["reason"]
    crashed = tmp_path / "crashed"
    copy_files(buffers.path, crashed)  # what kill -9 leaves now
    after, observer, recovered = await buffers.open(crashed)
    assert recovered == 300
    assert sample(observer, "forwarder_buffer_corruptions_total") == 0


async def test_a_lost_wal_that_cannot_be_checkpointed_refuses_appends_and_says_why(buffers, monkeypatch):
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("before", 10), 100.0)
    (buffers.path / (DB_NAME + "-wal")).unlink()
    monkeypatch.setattr(Store, "_checkpoint", lambda self, mode: False)  # e.g. a reader holds the old WAL
    with pytest.raises(BufferFull):
        await buf.append("p1", events("after", 1), 100.0)
    assert "-wal was deleted" in buf.problem and "refuses appends" in buf.problem
    monkeypatch.undo()
    buf.progress.disk_full_until = 0.0  # past the one second a refusal lasts
    await buf.append("p1", events("later", 1), 100.0)
    assert buf.problem is None


async def test_a_lost_wal_whose_new_connection_fails_to_open_is_reopened_by_a_later_cycle(buffers):
    calls = []

    def flaky(file: str) -> sqlite3.Connection:
        calls.append(file)
        if len(calls) == 2:  # the reconnect after the lost WAL was checkpointed
            raise sqlite3.OperationalError("unable to open database file")
        return connect(file)

    buf, _, _ = await buffers.open(connect_to=flaky)
    await buf.append("p1", events("before", 10), 100.0)
    (buffers.path / (DB_NAME + "-wal")).unlink()
    with pytest.raises(sqlite3.OperationalError):  # answered 503: nothing was committed
        await buf.append("p1", events("refused", 1), 100.0)
    await buf.append("p1", events("after", 5), 100.0)
    assert len(calls) == 3
    assert [body for _, _, body in rows_on_disk(buffers.path)] == events("before", 10) + events("after", 5)


def test_the_progress_invariants_refuse_a_cursor_past_what_was_committed():
    progress = Progress(committed=10, cursor=10, resent_upto=5)
    progress.check()
    progress.cursor = 11
    with pytest.raises(AssertionError, match="cursor 11 past committed 10"):
        progress.check()
    with pytest.raises(AssertionError, match="resent_upto 12 past 10"):
        Progress(committed=10, resent_upto=12).check()


# closing


async def test_every_file_of_the_buffer_is_readable_by_the_owner_only(buffers):
    # The database holds whole events: not for other users, whatever the umask (issue 21, item 7).
    previous = os.umask(0o022)
    try:
        buf, _, _ = await buffers.open()
        await buf.append("p1", events("a", 3), 100.0)
    finally:
        os.umask(previous)
    names = {f.name: oct(f.stat().st_mode & 0o777) for f in buffers.path.iterdir()}
    assert {DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"} <= set(names)
    assert set(names.values()) == {"0o600"}, names


async def test_close_is_idempotent_and_later_appends_fail(buffers):
    buf, _, _ = await buffers.open()
    await buf.append("p1", events("a", 1), 100.0)
    await asyncio.gather(buf.close(), buf.close())
    await buf.close()
    with pytest.raises(RuntimeError):
        await buf.append("p1", events("b", 1), 100.0)
    wal = buffers.path / (DB_NAME + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed
    assert len(rows_on_disk(buffers.path)) == 1


async def test_close_without_open_does_nothing(tmp_path):
    buf = DiskBuffer(BufferConfig(type="disk", path=str(tmp_path / "never")),
                     support.observer())
    await buf.close()
    assert not (tmp_path / "never").exists()


# A full disk, on a real (small) file system: the store alone, driven cycle by cycle.

PADDED = b'{"data":"' + b"x" * 400 + b'"}'


def padded(received_at: float, n: int) -> Append:
    return Append("p1", received_at, [PADDED] * n, len(PADDED) * n)


def fill_store(store: Store, per_cycle: int) -> int:
    """Append until the disk refuses; returns how many events were committed."""
    committed = 0
    for _ in range(10_000):
        cycled = store.cycle([padded(1.0, per_cycle)], [], False)
        if not cycled.appended:
            assert cycled.disk_full
            return committed
        committed += per_cycle
    raise AssertionError("the disk never filled up")


@pytest.mark.parametrize("per_cycle, acks_per_cycle", [(37, 50), (50, 50), (500, 50), (5000, 50), (500, 5000), (5000, 5000)])
def test_a_full_disk_still_deletes_every_delivered_row_and_then_accepts_again(small_disk, per_cycle, acks_per_cycle):
    # Found by a run: with large uncheckpointed WAL content at the moment the disk
    # filled, deleting delivered rows itself failed with SQLITE_FULL and delivery stopped.
    store = Store(str(small_disk / "buffer"), "never", clock=FakeClock())
    store.open()
    try:
        committed = fill_store(store, per_cycle)
        read = store.cycle([], [], True)
        assert sum(len(c.events) for c in read.chunks) > 0
        for first in range(1, committed + 1, acks_per_cycle):
            store.cycle([], list(range(first, min(first + acks_per_cycle, committed + 1))), True)
        assert rows_on_disk(small_disk / "buffer") == []
        cycled = store.cycle([padded(2.0, 50)], [], False)
        assert cycled.appended and not cycled.disk_full
    finally:
        store.close()


def test_every_accepted_append_leaves_the_reserve_in_place(small_disk):
    # The reserve is what a failed insert gives back so that deleting delivered rows still fits.
    store = Store(str(small_disk / "buffer"), "never", clock=FakeClock())
    store.open()
    reserve = small_disk / "buffer" / "buffer.reserve"
    try:
        refusals = accepted = 0
        while refusals < 3:
            cycled = store.cycle([padded(1.0, 100)], [], False)
            if cycled.appended:
                accepted += 1
                assert reserve.exists(), f"append {accepted} was committed without the reserve"
            else:
                refusals += 1
        assert accepted > 0
    finally:
        store.close()


def test_an_empty_file_from_an_older_version_is_converted_to_incremental_vacuum(tmp_path):
    store = Store(str(tmp_path / "buffer"), "never", clock=FakeClock())
    store.open()
    store.close()
    conn = sqlite3.connect(tmp_path / "buffer" / DB_NAME)
    conn.execute("PRAGMA auto_vacuum=NONE")
    conn.execute("VACUUM")
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    store = Store(str(tmp_path / "buffer"), "never", clock=FakeClock())
    store.open()
    store.close()
    conn = sqlite3.connect(tmp_path / "buffer" / DB_NAME)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    conn.close()


def test_a_cycle_commits_the_appends_that_fit_and_refuses_the_rest(small_disk):
    store = Store(str(small_disk / "buffer"), "never", clock=FakeClock())
    store.open()
    try:
        fill_store(store, 500)
        store.cycle([], list(range(1, 5001)), False)  # delivered: room for some, not all
        cycled = store.cycle([padded(2.0, 500) for _ in range(40)], [], False)
        assert 0 < cycled.appended < 40 and cycled.disk_full
        first_new = cycled.max_id - 500 * cycled.appended + 1
        assert [row[0] for row in rows_on_disk(small_disk / "buffer")][-1] == cycled.max_id >= first_new
    finally:
        store.close()


def failing_commits(failures: list[int]):
    """Connections whose next ``failures[0]`` COMMITs fail the way a full disk makes them fail."""
    class Connection(sqlite3.Connection):
        def execute(self, sql, *args):  # type: ignore[override]
            if sql == "COMMIT" and failures[0] > 0:
                failures[0] -= 1
                error = sqlite3.OperationalError("database or disk is full")
                error.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
                raise error
            return super().execute(sql, *args)

    def connect_to(file: str) -> sqlite3.Connection:
        return sqlite3.connect(file, isolation_level=None, factory=Connection)
    return connect_to


async def test_a_read_that_cannot_commit_on_a_full_disk_waits_and_is_answered_later(buffers):
    failures = [0]
    clock = FakeClock(0.0)
    buf, observer, _ = await buffers.open(connect_to=failing_commits(failures), clock=clock)
    await buf.append("p", events("a", 3), time.time())
    failures[0] = 3  # the read's transaction and both retries of it on a "full disk"
    with pytest.raises(BufferFull):
        await buf.append("p", events("b", 1), time.time())  # its cycle fails: 429, not an error
    chunks = await buf.read(5.0)  # the reader was kept, not failed: the flush loop goes on
    assert [e for c in chunks for e in c.events] == events("a", 3)
    assert sample(observer, "forwarder_buffer_write_errors_total") >= 1


@pytest.mark.parametrize(("costs", "room", "expected"), [
    ([], 100, 0),
    ([10, 20, 30], 60, 3),
    ([10, 20, 30], 59, 2),
    ([10, 20, 30], 9, 0),
    ([50, 1, 1], 49, 0),  # in order: a later small append never jumps an earlier large one
])
def test_fitting_counts_the_appends_that_fit_in_order(costs, room, expected):
    assert fitting(costs, room) == expected


def test_an_insert_costs_twice_its_rows_because_a_checkpoint_copies_the_wal_into_the_file():
    assert insert_cost(2, 150) == 2 * (150 + 2 * ROW_OVERHEAD)


# A full disk shared with another writer (issue 21, item 1): the store alone, cycle by cycle.

LARGE = b'{"data":"' + b"y" * 3000 + b'"}'  # a row per page: deleting one writes a whole page to the WAL


def large(n: int) -> Append:
    return Append("p1", 1.0, [LARGE] * n, len(LARGE) * n)


def occupy(disk: Path, leave: int = 0, name: str = "other") -> Path:
    """Another program takes every free byte of ``disk`` but ``leave``."""
    path = disk / name
    with open(path, "ab") as f:
        want = free_bytes(str(disk)) - leave
        if want > 0:
            os.posix_fallocate(f.fileno(), f.seek(0, os.SEEK_END), want)
    return path


def test_deleting_large_rows_on_a_full_disk_goes_in_smaller_transactions_until_they_fit(small_disk):
    # Found by a run: 500 deleted rows of 3 KB write 2 MB to the WAL, more than the whole
    # reserve; every cycle failed the same way and the buffer refused everything for good.
    store = Store(str(small_disk / "buffer"), "never", clock=FakeClock())
    store.open()
    try:
        for _ in range(20):
            store.cycle([large(100)], [], False)
        store.cycle([], [], True)
        occupy(small_disk)
        store.cycle([], list(range(1, 2001)), False)
        assert rows_on_disk(small_disk / "buffer") == []
    finally:
        store.close()


def test_the_reserve_is_taken_back_by_cycles_without_appends_once_there_is_room(small_disk):
    # The reserve given back on a full disk must be there for the next one, even
    # if nothing is appended in between (a drain with the intake idle).
    store = Store(str(small_disk / "buffer"), "never", clock=FakeClock())
    store.open()
    reserve = small_disk / "buffer" / "buffer.reserve"
    try:
        fill_store(store, 100)
        other = occupy(small_disk)
        store.cycle([], list(range(1, 1001)), True)
        assert not reserve.exists()  # given to SQLite to delete on a full disk
        other.unlink()
        store.cycle([], list(range(1001, 2001)), False)
        assert reserve.exists()
    finally:
        store.close()


def test_a_checkpoint_that_finds_the_disk_full_is_given_the_reserve_and_completes(small_disk):
    store = Store(str(small_disk / "buffer"), "never", clock=FakeClock())
    store.open()
    wal = small_disk / "buffer" / (DB_NAME + "-wal")
    try:
        store.cycle([padded(1.0, 200)], [], False)  # new pages in the WAL, not yet in the file
        assert wal_debt(store._files.conn, store.file) > 0
        occupy(small_disk)
        assert store._checkpoint("TRUNCATE")
        assert wal.stat().st_size == 0
        assert not (small_disk / "buffer" / "buffer.reserve").exists()
    finally:
        store.close()


def test_appends_leave_room_to_checkpoint_what_the_wal_already_holds(small_disk):
    # Twice an append's size is not enough when the WAL already holds pages the
    # file must grow for: accepting it would leave a WAL that can never be checkpointed.
    store = Store(str(small_disk / "buffer"), "never", clock=FakeClock())
    store.open()
    try:
        store.cycle([padded(1.0, 400)], [], False)
        conn = store._files.conn
        debt = wal_debt(conn, store.file)
        next_cost = insert_cost(100, len(PADDED) * 100)
        assert debt > next_cost // 2
        occupy(small_disk, leave=next_cost + debt // 2)  # room for the append, not for it and the WAL
        cycled = store.cycle([padded(2.0, 100)], [], False)
        assert not cycled.appended and cycled.disk_full and "the next append needs" in cycled.why_full
        assert wal_debt(conn, store.file) <= free_bytes(str(small_disk))
    finally:
        store.close()


class Backlog:
    """What a sender does to a store: reads, acks some of what it read; remembers every id."""

    def __init__(self, store: Store, rng: random.Random, clock: FakeClock) -> None:
        self.store, self.rng, self.clock = store, rng, clock
        self.appended: set[int] = set()
        self.acked: set[int] = set()
        self.unacked: list[int] = []

    def cycle(self, appends: list[Append], acks: int, read: bool) -> Cycled | None:
        self.clock.advance(self.rng.choice([0.01, 0.3, 1.5]))
        ids = self.unacked[:acks]
        try:
            cycled = self.store.cycle(appends, ids, read)
        except DiskFull:
            return None  # the acks are tried again, as the writer does
        del self.unacked[:acks]
        self.acked.update(ids)
        n = sum(len(a.events) for a in appends[:cycled.appended])
        self.appended.update(range(cycled.max_id - n + 1, cycled.max_id + 1))
        if cycled.chunks:
            self.unacked.extend(cycled.chunks[0].lease.ids)
        return cycled


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fills_and_drains_beside_another_writer_never_leave_appends_refused_once_there_is_room(small_disk, seed):
    rng = random.Random(seed)
    clock = FakeClock(0.0)
    store = Store(str(small_disk / "buffer"), "normal", clock=clock)
    store.open()
    backlog = Backlog(store, rng, clock)
    conn = store._files.conn
    try:
        for phase in range(4):
            for _ in range(150):
                if rng.random() < 0.06:
                    occupy(small_disk, leave=rng.randrange(0, 4 << 20), name=f"other-{rng.randrange(3)}")
                elif rng.random() < 0.03:
                    for other in small_disk.glob("other-*"):
                        other.unlink()
                n = rng.choice([0, 0, 20, 50, 500])
                appends = [rng.choice([padded, lambda at, n: large(n)])(1.0, n)] if n else []
                backlog.cycle(appends, rng.randrange(len(backlog.unacked) + 1), rng.random() < 0.5)
                # Whatever the other writer did, the reserve alone can checkpoint the WAL.
                assert wal_debt(conn, store.file) <= store._space.reserve.size, f"seed {seed}"
            for other in small_disk.glob("other-*"):
                other.unlink()
            for _ in range(100):  # the other writer is gone: deliver everything
                if backlog.cycle([], len(backlog.unacked), True) and not backlog.unacked:
                    break
            accepted = [backlog.cycle([padded(2.0, 50)], 0, False) for _ in range(2)]
            assert accepted[-1] is not None and accepted[-1].appended == 1, f"seed {seed}, phase {phase}"
            on_disk = {row[0] for row in rows_on_disk(small_disk / "buffer")}
            assert on_disk == backlog.appended - backlog.acked, f"seed {seed}, phase {phase}"
    finally:
        store.close()
