"""The datagram intake: events over a Unix datagram socket or loopback UDP, no answers.

The reader drains the sockets (``datagram_socket.Sockets``) until EAGAIN on
each wake-up (one callback for many datagrams) and only keeps the datagrams:
the less it does, the sooner it reads again. One appender task takes
everything read so far, decodes it together (``datagram_events``) and hands
the buffer one append per project (``datagram_append``), so a disk buffer's
commit latency is paid once per group, not per datagram, and reading goes on
while an append waits.

Backpressure: while the buffer is full or too many events wait for their
append, the sockets are not read. A Unix socket's queue then fills and its
senders' ``sendto`` blocks or gets EAGAIN; UDP drops, counted by the kernel
(``forwarder_datagram_kernel_drops_total``). Nothing read is ever dropped for
lack of room. benchmarks/RESULTS.md ("datagram") has the figures behind the design.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from forwarder.buffer.contract import Buffer
from forwarder.config import IntakeConfig
from forwarder.intake.datagram.append import GroupAppender
from forwarder.intake.datagram.decode import DatagramDecoder
from forwarder.intake.datagram.sockets import Bound, Sockets
from forwarder.observability import Observer
from forwarder.tasks import supervise
from forwarder.wakeup import Wakeup

# Datagrams read per wake-up and socket before the loop gets a turn: the flush
# loop and the sender share the loop with the reader.
DRAIN_MAX = 512
# Datagrams read and not yet taken by the appender: reading stops at either bound.
MAX_UNREAD = 20_000
MAX_UNREAD_BYTES = 16 * 2**20
FULL_POLL = 0.01  # seconds between two tries of an append the buffer had no room for
# Seconds the appender waits after a wake-up for more datagrams, so that it
# decodes and appends them in bigger groups (benchmarks/RESULTS.md, "datagram").
LINGER = 0.001
LINGER_ENOUGH = 256  # datagrams that make waiting pointless
FINAL_DRAIN_MAX = 100_000  # datagrams read at shutdown from what the kernel already holds


class DatagramIntake:
    """The datagram stage: reads the sockets, decodes what it read and has it appended; start / stop / close."""

    def __init__(self, config: IntakeConfig, default_project: str, buffer: Buffer, observer: Observer,
                 wall: Callable[[], float] = time.time, full_poll: float = FULL_POLL, linger: float = LINGER,
                 max_unread: int = MAX_UNREAD, region: str = "") -> None:
        self._config = config
        self._observer = observer
        self._wall = wall
        self._linger = linger
        self._max_unread = max_unread
        self._max_bytes = config.datagram_max_bytes
        self._decoder = DatagramDecoder(default_project, observer.datagram_rejected, region)
        self._sockets = Sockets(config, self._readable, observer.log)
        self._appender = GroupAppender(buffer, observer, full_poll, self._pause, self._sockets.resume)
        self._unread: list[bytes] = []  # read, not yet taken by the appender
        self._unread_bytes = 0
        self._unread_since = 0.0  # wall time the oldest of them was read
        self._wake = Wakeup()
        self._idle = asyncio.Event()  # set while nothing is held
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._on_crash: Callable[[BaseException], None] = lambda e: None
        observer.metrics.datagram_paused.set_function(lambda: 1 if self._sockets.bound and self._sockets.paused else 0)
        observer.metrics.datagram_kernel_drops.set_function(self.kernel_drops)

    @property
    def enabled(self) -> bool:
        return bool(self._config.datagram_socket or self._config.datagram_port)

    @property
    def paused(self) -> frozenset[str]:
        """Why the sockets are not read now (empty while reading)."""
        return frozenset(self._sockets.paused)

    @property
    def held(self) -> int:
        """Datagrams read and events decoded that are not in the buffer yet."""
        return len(self._unread) + self._appender.in_flight

    def kernel_drops(self) -> int | None:
        """UDP datagrams the kernel dropped for a full socket buffer (None without a UDP socket)."""
        return self._sockets.kernel_drops()

    # lifecycle

    async def start(self, on_crash: Callable[[BaseException], None]) -> None:
        """Open the configured sockets and start reading (nothing to do when none is configured)."""
        if not self.enabled:
            return
        self._on_crash = on_crash
        self._sockets.open()
        self._task = supervise(asyncio.create_task(self._append_loop(), name="datagram-appender"), on_crash)

    async def stop(self) -> None:
        """Stop taking datagrams, read what the kernel already holds, and wait until it is in the buffer."""
        if not self._sockets.bound or "draining" in self._sockets.paused:
            await self._idle.wait()
            return
        self._pause("draining")
        self._sockets.refuse_senders()
        for bound in self._sockets.bound:
            self._drain(bound, FINAL_DRAIN_MAX)
        await self._idle.wait()

    async def close(self) -> None:
        """Stop the appender, count what it could not append as dropped, close the sockets (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        left = self._appender.abandon()
        if self._unread:
            left += self._decoder.decode_all(self._take(), self._unread_since, {})
        if left:
            self._observer.events_dropped("shutdown", left)
        self._sockets.close()

    # reading

    def _readable(self, bound: Bound) -> None:
        try:
            self._drain(bound, DRAIN_MAX)
        except Exception as e:  # a bug in the reader itself: stop the daemon loudly
            self._pause("crashed")
            self._on_crash(e)

    def _drain(self, bound: Bound, limit: int) -> None:
        """Read up to ``limit`` datagrams, until the socket has no more; keep them for the appender."""
        unread = self._unread
        first = len(unread)
        self._sockets.receive(bound, limit, unread)
        n = len(unread) - first
        if not n:
            return
        if not first:
            self._unread_since = self._wall()
            self._idle.clear()
            self._wake.set()
        self._observer.datagrams_received(n)
        self._unread_bytes += sum(map(len, unread[first:]))
        if len(unread) >= self._max_unread or self._unread_bytes >= MAX_UNREAD_BYTES:
            self._pause("backlog")

    def _take(self) -> list[bytes]:
        datagrams, self._unread, self._unread_bytes = self._unread, [], 0
        return datagrams

    def _pause(self, reason: str) -> None:
        self._sockets.pause(reason)
        if reason != "draining":
            self._observer.datagram_paused(reason, self.held)

    # decoding, then appending

    async def _append_loop(self) -> None:
        while True:
            if not self._unread:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._linger and len(self._unread) < LINGER_ENOUGH and "draining" not in self._sockets.paused:
                await asyncio.sleep(self._linger)
            received_at = self._unread_since
            groups, events = self._decode(self._take())
            self._sockets.resume("backlog")
            await self._appender.append(list(groups.items()), events, received_at)

    def _decode(self, datagrams: list[bytes]) -> tuple[dict[str, list[bytes]], int]:
        """The valid events of ``datagrams`` by project, and how many they are."""
        most = self._max_bytes
        if any(len(data) > most for data in datagrams):
            kept = [data for data in datagrams if len(data) <= most]
            self._observer.datagram_rejected("oversized", len(datagrams) - len(kept),
                                             f"a datagram exceeds intake.datagram_max_bytes ({most})")
            datagrams = kept
        groups: dict[str, list[bytes]] = {}
        events = self._decoder.decode_all(datagrams, self._unread_since, groups)
        return groups, events
