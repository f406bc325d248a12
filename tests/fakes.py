"""Test doubles: a manual clock and a sink that records batches."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from aiohttp import web

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
