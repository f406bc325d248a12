"""The datagram intake: events over a Unix datagram socket or loopback UDP, no answers.

The reader drains the sockets until EAGAIN on each wake-up (one callback for
many datagrams) and only keeps the datagrams: the less it does, the sooner it
reads again. One appender task takes everything read so far, decodes it
together (``datagram_events``) and hands the buffer one append per project, so
a disk buffer's commit latency is paid once per group, not per datagram, and
reading goes on while an append waits.

Backpressure: while the buffer is full or too many events wait for their
append, the sockets are not read. A Unix socket's queue then fills and its
senders' ``sendto`` blocks or gets EAGAIN; UDP drops, counted by the kernel
(``forwarder_datagram_kernel_drops_total``). Nothing read is ever dropped for
lack of room. benchmarks/RESULTS.md ("datagram") has the figures behind the design.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Callable

from .buffer import Buffer, BufferFull
from .config import IntakeConfig
from .datagram_events import DatagramDecoder
from .datagram_socket import Bound, bind_udp, bind_unix, receive_buffer, remove_unix, udp_drops
from .observability import Observer
from .wakeup import Wakeup

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
    """The datagram sockets and their reader: a stage with start / stop / close."""

    def __init__(self, config: IntakeConfig, default_project: str, buffer: Buffer, observer: Observer,
                 wall: Callable[[], float] = time.time, full_poll: float = FULL_POLL, linger: float = LINGER,
                 max_unread: int = MAX_UNREAD) -> None:
        self._config = config
        self._buffer = buffer
        self._observer = observer
        self._wall = wall
        self._full_poll = full_poll
        self._linger = linger
        self._max_unread = max_unread
        self._max_bytes = config.datagram_max_bytes
        self._decoder = DatagramDecoder(default_project, observer.datagram_rejected)
        self.sockets: list[Bound] = []
        self._unread: list[bytes] = []  # read, not yet taken by the appender
        self._unread_bytes = 0
        self._unread_since = 0.0  # wall time the oldest of them was read
        self._in_flight = 0  # events the appender holds, decoded and not yet in the buffer
        self._paused: set[str] = set()  # why the sockets are not read; empty: reading
        self._wake = Wakeup()
        self._idle = asyncio.Event()  # set while nothing is held
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._on_crash: Callable[[BaseException], None] = lambda e: None
        self._loop: asyncio.AbstractEventLoop | None = None
        observer.metrics.datagram_paused.set_function(lambda: 1 if self.sockets and self._paused else 0)
        observer.metrics.datagram_kernel_drops.set_function(self.kernel_drops)

    @property
    def enabled(self) -> bool:
        return bool(self._config.datagram_socket or self._config.datagram_port)

    @property
    def paused(self) -> frozenset[str]:
        """Why the sockets are not read now (empty while reading)."""
        return frozenset(self._paused)

    @property
    def held(self) -> int:
        """Datagrams read and events decoded that are not in the buffer yet."""
        return len(self._unread) + self._in_flight

    def kernel_drops(self) -> int | None:
        """UDP datagrams the kernel dropped for a full socket buffer (None without a UDP socket)."""
        inodes = {b.inode for b in self.sockets if b.kind == "udp"}
        return udp_drops(inodes) if inodes else None

    # lifecycle

    async def start(self, on_crash: Callable[[BaseException], None]) -> None:
        """Open the configured sockets and start reading (nothing to do when none is configured)."""
        if not self.enabled:
            return
        self._loop = asyncio.get_running_loop()
        self._on_crash = on_crash
        c = self._config
        if c.datagram_socket:
            self.sockets.append(bind_unix(c.datagram_socket, int(c.datagram_socket_mode, 8)))
        if c.datagram_port:
            self.sockets.append(bind_udp(c.datagram_host, c.datagram_port, c.datagram_rcvbuf))
        self._task = asyncio.create_task(self._append_loop(), name="datagram-appender")
        self._task.add_done_callback(self._task_done)
        for bound in self.sockets:
            self._loop.add_reader(bound.sock.fileno(), self._readable, bound)
            self._observer.log.info("datagram_listening", kind=bound.kind, address=bound.address,
                                    rcvbuf=receive_buffer(bound.sock))

    async def stop(self) -> None:
        """Stop taking datagrams, read what the kernel already holds, and wait until it is in the buffer."""
        if not self.sockets or "draining" in self._paused:
            await self._idle.wait()
            return
        self._pause("draining")
        for bound in self.sockets:
            if bound.kind == "unix":
                # Senders get EPIPE from now on (no path: ENOENT); what is queued stays readable.
                bound.sock.shutdown(socket.SHUT_RD)
                remove_unix(bound)
        for bound in self.sockets:
            self._drain(bound, FINAL_DRAIN_MAX)
        await self._idle.wait()

    async def close(self) -> None:
        """Stop the appender, count what it could not append as dropped, close the sockets (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        left = self._in_flight
        if self._unread:
            left += self._decoder.decode_all(self._take(), self._unread_since, {})
        if left:
            self._observer.events_dropped("shutdown", left)
        self._in_flight = 0
        sockets, self.sockets = self.sockets, []
        for bound in sockets:
            if self._loop is not None and not self._paused:
                self._loop.remove_reader(bound.sock.fileno())
            bound.sock.close()
            if bound.kind == "unix":
                remove_unix(bound)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._on_crash(task.exception())  # type: ignore[arg-type]

    # reading

    def _readable(self, bound: Bound) -> None:
        try:
            self._drain(bound, DRAIN_MAX)
        except Exception as e:  # a bug in the reader itself: stop the daemon loudly
            self._pause("crashed")
            self._on_crash(e)

    def _drain(self, bound: Bound, limit: int) -> None:
        """Read up to ``limit`` datagrams, until the socket has no more; keep them for the appender."""
        recv, size = bound.sock.recv, self._max_bytes + 1  # one byte more: an oversized one shows
        unread = self._unread
        first = len(unread)
        add = unread.append
        try:
            for _ in range(limit):
                add(recv(size))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:  # e.g. a UDP socket's ICMP error: the socket stays usable
            self._observer.log.warning("datagram_receive_failed", address=bound.address, error=str(e))
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
        if not self._paused and self._loop is not None:
            for bound in self.sockets:
                self._loop.remove_reader(bound.sock.fileno())
        self._paused.add(reason)
        if reason != "draining":
            self._observer.datagram_paused(reason, self.held)

    def _resume(self, reason: str) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and self._loop is not None:
            for bound in self.sockets:
                self._loop.add_reader(bound.sock.fileno(), self._readable, bound)

    # decoding and appending

    async def _append_loop(self) -> None:
        while True:
            if not self._unread:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._linger and len(self._unread) < LINGER_ENOUGH and "draining" not in self._paused:
                await asyncio.sleep(self._linger)
            received_at = self._unread_since
            groups = self._decode(self._take())
            self._resume("backlog")
            await self._append(list(groups.items()), received_at)

    def _decode(self, datagrams: list[bytes]) -> dict[str, list[bytes]]:
        most = self._max_bytes
        if any(len(data) > most for data in datagrams):
            kept = [data for data in datagrams if len(data) <= most]
            self._observer.datagram_rejected("oversized", len(datagrams) - len(kept),
                                             f"a datagram exceeds intake.datagram_max_bytes ({most})")
            datagrams = kept
        groups: dict[str, list[bytes]] = {}
        self._in_flight = self._decoder.decode_all(datagrams, self._unread_since, groups)
        return groups

    async def _append(self, groups: list[tuple[str, list[bytes]]], received_at: float) -> None:
        """Append every group, keeping the refused ones (and the reader paused) until the buffer takes them."""
        if len(groups) == 1:
            refused = await self._append_in_order(groups, received_at)
        else:  # one append per project in flight together: one disk commit takes them all
            results = await asyncio.gather(*(self._buffer.append(p, evs, received_at) for p, evs in groups),
                                           return_exceptions=True)
            refused = []
            for group, result in zip(groups, results):
                if result is None:
                    self._appended(len(group[1]))
                elif isinstance(result, Exception):
                    refused += self._refused(group, result)
                else:
                    raise result  # CancelledError and friends
        while refused:
            await self._wait_for_room()
            refused = await self._append_in_order(refused, received_at)
        self._resume("buffer_full")

    async def _append_in_order(self, groups: list[tuple[str, list[bytes]]],
                               received_at: float) -> list[tuple[str, list[bytes]]]:
        """Append one group after the other; returns the first refused one and those after it."""
        for k, (project, events) in enumerate(groups):
            try:
                await self._buffer.append(project, events, received_at)
            except Exception as e:
                return self._refused(groups[k], e) + groups[k + 1:]
            self._appended(len(events))
        return []

    def _refused(self, group: tuple[str, list[bytes]], error: Exception) -> list[tuple[str, list[bytes]]]:
        """What to try again: a group the buffer has no room for is halved, so that it fits
        as soon as part of it can (a group may even exceed the whole buffer)."""
        project, events = group
        if not isinstance(error, BufferFull):
            self._observer.datagram_append_failed(len(events), error)
            return [group]
        if len(events) == 1:
            return [group]
        half = len(events) // 2
        return [(project, events[:half]), (project, events[half:])]

    def _appended(self, n: int) -> None:
        self._in_flight -= n
        self._observer.events_received(n)

    async def _wait_for_room(self) -> None:
        # Polled: the buffer has no "room again" signal, and its ``full`` flag stays
        # up until an acknowledgement, which a too-large group may never get to see.
        self._pause("buffer_full")
        await asyncio.sleep(self._full_poll)
