"""Never lose an acknowledged event: real daemons killed, stopped, refused and fed damaged files.

An event counts as acknowledged only when its intake request got a 200. The
emulator identifies events by their ``data`` ({"i": n}), so each check reads
"every acknowledged n arrived", and duplicates are reported, not forbidden
(delivery is at least once).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from forwarder.config import BufferConfig
from forwarder.buffer.disk.buffer import DB_NAME, DiskBuffer
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, free_port, wait_for
from tests import support

pytestmark = pytest.mark.e2e

DRAIN_TIMEOUT = 2.0
EXIT_MARGIN = 3.0  # seconds past drain_timeout for closing the client, listeners and buffer


def settings(emulator_url: str, buffer_type: str = "disk", **buffer: Any) -> dict[str, dict[str, Any]]:
    return {
        "intake": {"port": free_port()},
        "evidently": {"endpoint_url": emulator_url, "concurrency": 4},
        "buffer": {"type": buffer_type, **buffer},
        "batch": {"flush_interval": 0.2},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.5},
        "shutdown": {"drain_timeout": DRAIN_TIMEOUT},
    }


async def start(procs, session, tmp_path: Path, sections: dict) -> ForwarderProcess:
    """A forwarder on ``sections``; the same sections again restart it on the same state and port."""
    fwd = procs(ForwarderProcess(tmp_path, copy.deepcopy(sections)))
    await fwd.ready(session)
    return fwd


async def post_all(fwd: ForwarderProcess, session, total: int, per_request: int = 50) -> set[int]:
    acked: set[int] = set()
    for start_at in range(0, total, per_request):
        status, body = await fwd.post(session, "p1", support.numbered(start_at, per_request))
        assert status == 200, body
        acked.update(range(start_at, start_at + per_request))
    return acked


async def delivered_ids(emulator: EmulatorProcess, session) -> Counter:
    return Counter(orjson.loads(e["data"])["i"] for e in await emulator.events(session))


async def wait_delivered(emulator: EmulatorProcess, session, acked: set[int], timeout: float = 30.0) -> Counter:
    async def all_there() -> bool:
        return acked <= set(await delivered_ids(emulator, session))
    await wait_for(all_there, timeout, f"{len(acked)} acknowledged events at the emulator")
    return await delivered_ids(emulator, session)


def log_events(fwd: ForwarderProcess, name: str) -> list[dict]:
    found = []
    for line in fwd.logs().splitlines():
        if f'"{name}"' in line:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return [e for e in found if e.get("event") == name]


# 1. kill -9 with Evidently down


async def test_events_acknowledged_while_evidently_is_down_survive_kill_9(tmp_path, procs, session):
    emulator = procs(EmulatorProcess(tmp_path, "--down"))
    await emulator.ready(session)
    sections = settings(emulator.url)
    fwd = await start(procs, session, tmp_path, sections)
    acked = await post_all(fwd, session, 3000)

    fwd.signal(signal.SIGKILL)
    assert await fwd.wait(10) == -signal.SIGKILL
    await emulator.configure(session, down=False)
    again = await start(procs, session, tmp_path, sections)

    counts = await wait_delivered(emulator, session, acked)
    assert set(counts) == acked
    assert [i for i, n in counts.items() if n > 1] == []  # nothing had reached Evidently before the kill
    assert log_events(again, "buffer_recovered")[0]["events"] == 3000


# 2. ten kill -9 at random moments while events flow


class Client:
    """Posts 50-event requests in order, retrying refusals; remembers what got a 200."""

    def __init__(self, session: aiohttp.ClientSession, url: str, total: int, pace: float) -> None:
        self.session, self.url, self.total, self.pace = session, url, total, pace
        self.acked: set[int] = set()
        self.ambiguous: set[int] = set()  # sent again after a connection died mid-request
        self.refused = Counter()

    async def run(self, deadline: float) -> None:
        for start_at in range(0, self.total, 50):
            await self._post_until_acknowledged(start_at, deadline)
            await asyncio.sleep(self.pace)

    async def _post_until_acknowledged(self, start_at: int, deadline: float) -> None:
        body = orjson.dumps({"events": support.numbered(start_at, 50)})
        while time.monotonic() < deadline:
            try:
                async with self.session.post(f"{self.url}/events/projects/p1", data=body,
                                             headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status == 200:
                        self.acked.update(range(start_at, start_at + 50))
                        return
                    self.refused[r.status] += 1
            except aiohttp.ClientConnectorError:
                self.refused["connect"] += 1  # nothing was sent
            except (aiohttp.ClientError, asyncio.TimeoutError):
                # The forwarder may have committed these before it died: a resend is the client's duplicate.
                self.ambiguous.update(range(start_at, start_at + 50))
            await asyncio.sleep(0.05)
        raise AssertionError(f"request {start_at} was never acknowledged")


async def test_ten_kill_9_at_random_moments_lose_no_acknowledged_event(tmp_path, procs, session):
    # FORWARDER_TEST_SEED=<n> replays a failed run (its seed is in the test's output).
    seed = int(os.environ.get("FORWARDER_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    # Latency keeps batches in flight, so kills land between "Evidently has them" and the ack.
    emulator = procs(EmulatorProcess(tmp_path, "--latency", "0.05"))
    await emulator.ready(session)
    sections = settings(emulator.url)
    fwd = await start(procs, session, tmp_path, sections)
    client = Client(session, fwd.url, total=20_000, pace=0.025)
    sending = asyncio.create_task(client.run(time.monotonic() + 50))
    counted_duplicates = 0.0

    for _ in range(10):
        await asyncio.sleep(rng.uniform(0.2, 1.0))  # a random moment, not a wait for a condition
        # The duplicates counter dies with the process: read it at the last moment.
        counted_duplicates += await fwd.metric(session, "forwarder_duplicates_total")
        fwd.signal(signal.SIGKILL)
        await fwd.wait(10)
        fwd = await start(procs, session, tmp_path, sections)
    await asyncio.wait_for(sending, 50)

    counts = await wait_delivered(emulator, session, client.acked)
    counted_duplicates += await fwd.metric(session, "forwarder_duplicates_total")
    duplicated = {i: n - 1 for i, n in counts.items() if n > 1}
    by_forwarder = sum(n for i, n in duplicated.items() if i not in client.ambiguous)
    print(f"seed={seed} acked={len(client.acked)} delivered={len(counts)} "
          f"duplicates={sum(duplicated.values())} (client resends {len(client.ambiguous)} events, "
          f"forwarder {by_forwarder}, forwarder counted {counted_duplicates:.0f}) refused={dict(client.refused)}")
    assert len(client.acked) == 20_000
    assert client.acked - set(counts) == set()
    assert fwd.dead_letters() == []
    # Every duplicate the client did not cause was counted by the forwarder as possible.
    assert by_forwarder <= counted_duplicates, f"seed={seed}"


# 3. graceful drain in memory mode


async def test_sigterm_in_memory_mode_drains_every_acknowledged_event_within_drain_timeout(
        tmp_path, procs, session):
    emulator = procs(EmulatorProcess(tmp_path, "--latency", "0.05"))
    await emulator.ready(session)
    fwd = await start(procs, session, tmp_path, settings(emulator.url, "memory"))
    acked = await post_all(fwd, session, 3000)
    at_sigterm = len(await delivered_ids(emulator, session))

    stopping = time.monotonic()
    fwd.terminate()
    assert await fwd.wait(DRAIN_TIMEOUT + EXIT_MARGIN) == 0
    print(f"{at_sigterm} of 3000 delivered at SIGTERM; exited after {time.monotonic() - stopping:.2f}s")

    assert set(await delivered_ids(emulator, session)) >= acked
    assert log_events(fwd, "stopped")[0]["undelivered"] == 0


# 4. a damaged buffer file


async def make_truncated_buffer(path: Path) -> None:
    buf = DiskBuffer(BufferConfig(type="disk", path=str(path)), support.observer())
    await buf.open()
    for i in range(10):
        await buf.append("p1", [b'{"data":"{}","timestamp":1,"type":"x"}'] * 500, time.time())
    await buf.close()
    db = path / DB_NAME
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
async def test_a_damaged_buffer_file_is_reported_and_the_daemon_still_delivers(tmp_path, procs, session,
                                                                              emulator_process, damage):
    state = tmp_path / "forwarder-state"
    if damage == "garbage":
        state.mkdir()
        (state / DB_NAME).write_bytes(random.Random(1).randbytes(64 * 1024))
    else:
        await make_truncated_buffer(state)
    fwd = await start(procs, session, tmp_path, settings(emulator_process.url))

    [reported] = log_events(fwd, "buffer_corrupted")
    assert reported["path"] == str(state / DB_NAME)
    assert reported["level"] == "error"
    assert Path(reported["moved_to"]).exists()
    assert await fwd.metric(session, "forwarder_buffer_corruptions_total") == 1
    acked = await post_all(fwd, session, 200)
    await wait_delivered(emulator_process, session, acked)


# 5. backpressure: a full buffer answers 429


async def test_a_full_disk_buffer_answers_429_until_evidently_is_back(tmp_path, procs, session):
    emulator = procs(EmulatorProcess(tmp_path, "--down"))
    await emulator.ready(session)
    fwd = await start(procs, session, tmp_path, settings(emulator.url, max_events=1000))

    acked: set[int] = set()
    for start_at in range(0, 1100, 50):
        async with session.post(f"{fwd.url}/events/projects/p1", data=orjson.dumps({"events": support.numbered(start_at, 50)}),
                                headers={"Content-Type": "application/json"}) as r:
            if r.status == 200:
                acked.update(range(start_at, start_at + 50))
                continue
            assert r.status == 429
            assert r.headers["x-amzn-ErrorType"] == "ThrottlingException"
            assert int(r.headers["Retry-After"]) >= 1
            break
    assert len(acked) == 1000
    async with session.get(f"{fwd.url}/readyz") as r:
        assert r.status == 503
        assert (await r.json())["reason"] == "buffer full"

    await emulator.configure(session, down=False)
    await wait_delivered(emulator, session, acked)

    async def ready() -> bool:
        async with session.get(f"{fwd.url}/readyz") as r:
            return r.status == 200
    await wait_for(ready, 10, "/readyz 200 once the buffer has drained")


# SIGTERM in disk mode with Evidently down


async def test_sigterm_in_disk_mode_with_evidently_down_exits_in_time_and_keeps_the_events(
        tmp_path, procs, session):
    emulator = procs(EmulatorProcess(tmp_path, "--down"))
    await emulator.ready(session)
    sections = settings(emulator.url)
    fwd = await start(procs, session, tmp_path, sections)
    acked = await post_all(fwd, session, 500)

    fwd.terminate()
    assert await fwd.wait(DRAIN_TIMEOUT + EXIT_MARGIN) == 0
    assert log_events(fwd, "left_on_disk")[0]["events"] == 500

    await emulator.configure(session, down=False)
    await start(procs, session, tmp_path, sections)
    counts = await wait_delivered(emulator, session, acked)
    assert set(counts) == acked


# a disk that fills up (issue 16, item 8): a real small file system


async def test_a_full_disk_refuses_new_events_keeps_delivering_and_recovers_by_itself(
        tmp_path, procs, session, small_disk):
    emulator = procs(EmulatorProcess(tmp_path, "--down"))
    await emulator.ready(session)
    config = settings(emulator.url, path=str(small_disk / "buffer"), max_events=10_000_000, max_bytes=1 << 30)
    config["dead_letter"] = {"path": str(tmp_path / "dead-letter.ndjson")}
    fwd = await start(procs, session, tmp_path, config)

    acked: set[int] = set()
    payload = "x" * 400  # fills 16 MiB in about 40k events
    for start_at in range(0, 200_000, 500):
        body = {"events": [{"data": {"i": i, "pad": payload}} for i in range(start_at, start_at + 500)]}
        async with session.post(f"{fwd.url}/events/projects/p1", data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"}) as r:
            if r.status == 429:
                break
            assert r.status == 200, await r.text()
            acked.update(range(start_at, start_at + 500))
    else:
        raise AssertionError("the disk never filled up")
    async with session.get(f"{fwd.url}/readyz") as r:
        assert r.status == 503 and "disk is full" in (await r.json())["reason"]

    await emulator.configure(session, down=False)  # delivery goes on: acks commit on a full disk
    await wait_delivered(emulator, session, acked, timeout=60)

    async def accepting_again() -> bool:
        async with session.post(f"{fwd.url}/events/projects/p1", data=orjson.dumps({"events": support.numbered(10**6, 50)}),
                                headers={"Content-Type": "application/json"}) as r:
            return r.status == 200
    await wait_for(accepting_again, 30, "new events accepted once the disk has room")
    async with session.get(f"{fwd.url}/readyz") as r:
        assert r.status == 200
    fwd.terminate()
    assert await fwd.wait(DRAIN_TIMEOUT + EXIT_MARGIN) == 0
    assert "Traceback" not in fwd.logs()
    arrived = await delivered_ids(emulator, session)
    assert acked | set(range(10**6, 10**6 + 50)) <= set(arrived)


class OtherWriter:
    """Another program on the buffer's file system: writes until the disk is full, then lets go."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = 0

    def fill(self, nbytes: int) -> None:
        self.files += 1
        try:
            with open(self.directory / f"other-{self.files}", "wb") as f:
                for _ in range(nbytes // 65536):
                    f.write(b"o" * 65536)
                    f.flush()
        except OSError:
            pass  # ENOSPC: it took what there was

    def remove(self) -> None:
        for f in self.directory.glob("other-*"):
            f.unlink()


async def post_until_refused(fwd: ForwarderProcess, session, start_at: int, size: int,
                             other: OtherWriter) -> set[int]:
    acked: set[int] = set()
    payload = "x" * 2000
    for first in range(start_at, start_at + 10**6, size):
        if first == start_at + 20 * size:
            other.fill(8 << 20)  # half-way through the fill, the other writer takes what it can
        body = {"events": [{"data": {"i": i, "pad": payload}} for i in range(first, first + size)]}
        async with session.post(f"{fwd.url}/events/projects/p1", data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"}) as r:
            if r.status == 429:
                return acked
            assert r.status == 200, await r.text()
            acked.update(range(first, first + size))
    raise AssertionError("the disk never filled up")


async def test_ten_fill_and_drain_cycles_beside_another_writer_never_wedge_nor_lose_an_event(
        tmp_path, procs, session, small_disk):
    # Issue 21, item 1: on the second cycle deleting delivered rows no longer fitted on the
    # disk and every request got 429 for good, with room on the disk and a healthy upstream.
    emulator = procs(EmulatorProcess(tmp_path, "--down"))
    await emulator.ready(session)
    config = settings(emulator.url, path=str(small_disk / "buffer"), max_events=10_000_000, max_bytes=1 << 30)
    config["dead_letter"] = {"path": str(tmp_path / "dead-letter.ndjson")}
    fwd = await start(procs, session, tmp_path, config)
    other = OtherWriter(small_disk)
    acked: set[int] = set()
    next_i = 0
    for cycle in range(10):
        await emulator.configure(session, down=True)
        filled = await post_until_refused(fwd, session, next_i, 100, other)
        next_i += 10**6
        assert filled, f"cycle {cycle}: nothing accepted"
        acked |= filled
        async with session.get(f"{fwd.url}/readyz") as r:
            assert r.status == 503 and "disk is full" in (await r.json())["reason"], f"cycle {cycle}"
        if cycle in (3, 7):  # a crash on the full disk, and a start on it
            fwd.signal(signal.SIGKILL)
            await fwd.wait(10)
            fwd = procs(ForwarderProcess(tmp_path, copy.deepcopy(config)))
            fwd.health_url = f"{fwd.url}/healthz"  # not ready while the disk is full, but up
            await fwd.ready(session)
        await emulator.configure(session, down=False)
        await fwd.wait_drained(session, 60)

        async def accepting_again() -> bool:  # the other writer's file is still there: room for some
            nonlocal next_i
            status, _ = await fwd.post(session, "p1", support.numbered(next_i, 50))
            if status == 200:
                acked.update(range(next_i, next_i + 50))
                next_i += 50
            return status == 200
        await wait_for(accepting_again, 10, f"cycle {cycle}: new events accepted once the backlog was delivered")
        async with session.get(f"{fwd.url}/readyz") as r:
            assert r.status == 200, f"cycle {cycle}: {await r.text()}"
        other.remove()

    await fwd.wait_drained(session, 60)
    counts = await delivered_ids(emulator, session)
    assert acked - set(counts) == set()
    assert [i for i, n in counts.items() if n > 1] == []  # no call was in flight when a refusal came
    assert "Traceback" not in fwd.logs()


async def test_a_wal_deleted_under_the_running_daemon_is_noticed_and_survives_kill_9(tmp_path, procs, session):
    # Issue 21, item 5: -wal and -shm deleted while running; 100 more events got a 200,
    # and after a kill -9 all 300 were gone.
    emulator = procs(EmulatorProcess(tmp_path, "--down"))
    await emulator.ready(session)
    sections = settings(emulator.url)
    fwd = await start(procs, session, tmp_path, sections)
    acked = await post_all(fwd, session, 200)
    state = tmp_path / "forwarder-state"
    for suffix in ("-wal", "-shm"):
        (state / (DB_NAME + suffix)).unlink()
    status, body = await fwd.post(session, "p1", support.numbered(200, 100))
    assert status == 200, body  # committed only after the old WAL was copied into the database file
    acked.update(range(200, 300))

    async def reported() -> bool:
        return bool(log_events(fwd, "buffer_wal_lost"))
    await wait_for(reported, 5, "the lost WAL to be reported")
    fwd.signal(signal.SIGKILL)
    await fwd.wait(10)
    await emulator.configure(session, down=False)
    await start(procs, session, tmp_path, sections)
    counts = await wait_delivered(emulator, session, acked)
    assert set(counts) >= acked
