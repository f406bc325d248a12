"""Test doubles: a manual clock, virtual time, a sink that records batches, and the sender's buffer,
dead-letter file and transport stand-ins."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager
from typing import AsyncIterator

import orjson
from aiohttp import web

from forwarder.buffer.contract import Lease, Receipt
from forwarder.delivery.batcher import Batch


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSink:
    def __init__(self) -> None:
        self.batches: list[Batch] = []

    async def send(self, batch: Batch) -> None:
        self.batches.append(batch)


class VirtualTime:
    """Runs an asyncio event loop on virtual time: when the loop would block until
    its next timer, the clock jumps to it instead. Timeouts, sleeps and the
    stages' injected clocks (``time``, ``wall``) all read the same virtual time,
    so a test of a 60 s outage takes milliseconds and asserts on exact instants.
    Only for tests without real I/O: a socket still waiting for its peer would
    see time jump past its timeouts.
    """

    EPOCH = 1_790_000_000.0  # what ``wall`` reads when ``time`` reads 0

    def __init__(self, loop) -> None:
        self.now = 0.0
        self._loop = loop
        self._select = loop._selector.select
        loop.time = self.time
        loop._selector.select = self._virtual_select

    def time(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.EPOCH + self.now

    def _virtual_select(self, timeout):
        if timeout is None:
            return self._select(None)  # no timer pending: only I/O can wake the loop
        ready = self._select(0)
        if not ready and timeout > 0:
            # At least a microsecond: a waiter that re-checks "due <= now" after a
            # timer fired within the loop's clock resolution must see time move,
            # or float rounding can leave it a fraction of an ulp short forever.
            self.now += max(timeout, 1e-6)
        return ready

    def restore(self) -> None:
        del self._loop.time
        self._loop._selector.select = self._select


@asynccontextmanager
async def local_server(app: web.Application) -> AsyncIterator[str]:
    """``app`` served on a free 127.0.0.1 port for the duration; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class Ledger:
    """A buffer stand-in: hands out leases and records which events come back acknowledged (once each)."""

    def __init__(self, wall) -> None:
        self.acked: Counter[bytes] = Counter()
        self.depth = 0
        self._wall = wall
        self._events: dict[int, list[bytes]] = {}

    def batch(self, project: str, evs: list[bytes]) -> Batch:
        lease = Lease(map(len, evs))
        self._events[id(lease)] = list(evs)
        self.depth += len(evs)
        batch = Batch(project, self._wall())
        batch.fill(evs, lease, 0)
        return batch

    async def ack(self, receipt: Receipt) -> None:
        for lease, start, stop in receipt.runs:
            positions, _, repeats = lease.resolve(start, stop)
            assert repeats == 0, "an event was acknowledged twice"
            self.acked.update(self._events[id(lease)][p] for p in positions)
            self.depth -= len(positions)


class DeadLetters:
    def __init__(self, failures: int = 0) -> None:
        self.entries: list[dict] = []
        self.failures = failures  # the next writes that fail (e.g. disk full)

    async def write(self, data: bytes) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        self.entries.extend(orjson.loads(line) for line in data.splitlines())

    def events(self) -> list[bytes]:
        return [orjson.dumps(e["event"]) for e in self.entries]


class Scripted:
    """A transport answering from a function of (call number, project, events, time)."""

    def __init__(self, answer, clock=lambda: 0.0) -> None:
        self.answer = answer
        self.clock = clock
        self.calls: list[tuple[str, list[bytes], float]] = []
        self.delivered: Counter[bytes] = Counter()

    async def put_events(self, project, events):
        self.calls.append((project, list(events), self.clock()))
        result = self.answer(len(self.calls) - 1, project, events)
        if result.status == 200 or result.maybe_delivered:
            failed = {i for i, _, _ in result.failed}
            self.delivered.update(e for i, e in enumerate(events) if i not in failed)
        await asyncio.sleep(0)
        return result
