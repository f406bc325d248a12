"""The intake's connections: accepting, the connection limit, timeouts and bounds.

The listeners accept here rather than through ``loop.create_server`` so that a
connection counts against one limit from the moment ``accept()`` returns (a TLS
handshake included), and so that the limit is enforced before any protocol is
built for it. At the limit the connection idle the longest is closed to make
room; with nothing idle the newcomer gets a 503 and is closed at once. The limit
stays below RLIMIT_NOFILE, so ``accept()`` does not hit EMFILE (asyncio would
then stop accepting for a second and log a traceback per attempt).

Timeouts: aiohttp's keep-alive timer closes a connection whose next request has
not arrived ``idle_timeout`` seconds after it opened or after its last answer;
a sweep every second closes one whose request head has taken more than
``header_timeout`` since its first byte (slowloris) and fails a body that has
taken more than ``body_timeout``. The sweep costs nothing per request.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable

import orjson
from aiohttp import web

from forwarder.evidently.protocol import request_id
from forwarder.intake.aiohttp_fence import BodyTimeout, Handler, IntakeProtocol, Phase, make_server, shut_down
from forwarder.observability import Observer
from forwarder.tasks import supervise

# Files the daemon needs beside the intake's connections: interpreter, buffer
# database (3 files), dead-letter file, event loop, metrics port, logs.
FIXED_FILES = 64
# Connections accepted per readiness event. A connection evicted to make room
# is closed on the next loop iteration, so a batch can hold this many more
# descriptors for a moment: the reserve covers it.
ACCEPT_BATCH = 64
# The kernel's accept queue: a burst of connects waits there instead of having
# SYNs dropped (a client retries a dropped SYN after 1 s).
LISTEN_BACKLOG = 1024
MIN_CONNECTIONS = 8
SWEEP_INTERVAL = 1.0  # seconds; timeouts are enforced within one interval
ACCEPT_RETRY_DELAY = 0.1  # seconds before accepting again after EMFILE with nothing to evict


@dataclass(frozen=True)
class Limits:
    max_connections: int
    idle_timeout: float
    header_timeout: float
    body_timeout: float
    max_header_bytes: int


def connection_limit(configured: int, nofile: int, upstream: int) -> int:
    """Connections the intake may hold: ``configured``, lowered to stay below RLIMIT_NOFILE.

    ``upstream`` is the most connections the sender opens to Evidently.
    """
    return max(0, min(configured, nofile - FIXED_FILES - ACCEPT_BATCH - upstream))


def overdue(phase: Phase, since: float, now: float, limits: Limits) -> str | None:
    """The timeout a connection in ``phase`` since ``since`` has run out at ``now``, or None."""
    if phase is Phase.HEAD and now - since >= limits.header_timeout:
        return "header_timeout"
    if phase is Phase.BODY and now - since >= limits.body_timeout:
        return "body_timeout"
    if phase is Phase.WRITING and now - since >= limits.idle_timeout:
        return "write_timeout"
    return None


def raw_error(status: int, error_type: str, message: str) -> bytes:
    """A whole AWS-style error answer that closes the connection, for when no request object exists."""
    body = orjson.dumps({"message": message})
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"x-amzn-ErrorType: {error_type}\r\nx-amzn-RequestId: {request_id()}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class Connections:
    """Every intake connection, across listeners: the limit, the idle order, the sweep.

    It speaks to aiohttp only through aiohttp_fence (IntakeProtocol's public
    methods, ``make_server``, ``shut_down``).
    """

    def __init__(self, limits: Limits, observer: Observer, clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = asyncio.get_running_loop()
        self.limits = limits
        self.observer = observer
        self._clock = clock
        # Least recently active first: a connection moves to the end when a request starts.
        self._order: OrderedDict[IntakeProtocol, None] = OrderedDict()
        self._listeners: list[_Acceptor] = []
        self._sweeper: _Sweeper | None = None

    @property
    def count(self) -> int:
        return len(self._order)

    @property
    def protocols(self) -> list[IntakeProtocol]:
        """The open connections, the longest idle first (the eviction order)."""
        return list(self._order)

    @property
    def alive(self) -> bool:
        """False once the sweep has crashed: timeouts would no longer apply (/healthz says so)."""
        return self._sweeper is None or self._sweeper.alive

    def server(self, handler: Handler, client_max_size: int) -> web.Server:
        """The HTTP server for one kind of listener; a request starting makes its connection the most recent."""
        return make_server(handler, self, client_max_size)

    def listen(self, sock: socket.socket, server: web.Server, tls: ssl.SSLContext | None) -> None:
        """Accept on ``sock`` (bound and listening), handing requests to ``server``."""
        acceptor = _Acceptor(self, sock, server, tls)
        self._listeners.append(acceptor)
        acceptor.start()

    def start(self) -> None:
        """Start the sweep."""
        self._sweeper = _Sweeper(self, self._clock)

    async def close(self, timeout: float) -> None:
        """Stop accepting, then let requests in progress finish within ``timeout`` (idempotent)."""
        listeners, self._listeners = self._listeners, []
        for acceptor in listeners:
            acceptor.stop()
        if self._sweeper is not None:
            await self._sweeper.stop()
            self._sweeper = None
        connecting = [p.accept_task for p in self._order if p.accept_task is not None]
        for task in connecting:
            task.cancel()
        await asyncio.gather(*connecting, return_exceptions=True)
        await asyncio.sleep(0)  # requests already received start before idle connections are closed
        await shut_down([acceptor.server for acceptor in listeners], timeout)

    # bookkeeping

    def add(self, protocol: IntakeProtocol) -> None:
        self._order[protocol] = None

    def forget(self, protocol: IntakeProtocol) -> None:
        self._order.pop(protocol, None)

    def request_started(self, protocol: IntakeProtocol) -> None:
        """A request starts on ``protocol``: it becomes the most recently active."""
        try:
            self._order.move_to_end(protocol)
        except KeyError:  # evicted or lost while its request was queued
            pass

    def rejected(self, reason: str, exc: BaseException | None = None) -> None:
        self.observer.events_rejected(reason, 1)
        if exc is not None:
            self.observer.limited("error", "intake_internal_error", error=repr(exc), exc_info=exc)

    def internal_error(self, message: str, exc: BaseException | None) -> None:
        self.observer.limited("error", "intake_internal_error", message=message, exc_info=exc)

    def head_too_large(self, protocol: IntakeProtocol, size: int, answerable: bool) -> None:
        """``protocol`` got a request head over intake.max_header_bytes: a 431 if it can still answer, then close."""
        limit = self.limits.max_header_bytes
        answer = None
        if answerable:
            answer = raw_error(431, "RequestHeaderFieldsTooLargeException",
                               f"the request head is more than {size} bytes; intake.max_header_bytes is {limit}")
        self.hang_up(protocol, "headers_too_large", answer)

    # the limit

    def make_room(self) -> bool:
        """True when one more connection fits, after closing the longest-idle one if needed."""
        return len(self._order) < self.limits.max_connections or self.evict()

    def evict(self) -> bool:
        """Close the connection idle the longest to make room; False when every one has a request in progress."""
        victim = self._longest_idle()
        if victim is None:
            return False
        self.hang_up(victim, "evicted", None)
        return True

    def _longest_idle(self) -> IntakeProtocol | None:
        busy = []
        victim = None
        for protocol in self._order:
            if protocol.phase.evictable:
                victim = protocol
                break
            busy.append(protocol)
        for protocol in busy:  # active: scanned past once, not again at the next accept
            self._order.move_to_end(protocol)
        return victim

    def hang_up(self, protocol: IntakeProtocol, reason: str, answer: bytes | None) -> None:
        """Close ``protocol`` now (after ``answer``, if any), counted under ``reason``."""
        self.forget(protocol)
        self.observer.connection_closed(reason, len(self._order), self.limits.max_connections)
        if answer is not None:
            self.rejected(reason)
        protocol.close_now(answer)

    def refused(self) -> None:
        self.rejected("connection_limit")
        self.observer.connection_closed("refused", len(self._order), self.limits.max_connections)

    # the timeouts

    def sweep(self, now: float) -> None:
        """Apply the header and body timeouts as of ``now``."""
        for protocol in list(self._order):
            phase, since = protocol.observe(now)
            reason = overdue(phase, since, now, self.limits)
            if reason == "header_timeout":
                self.hang_up(protocol, reason, raw_error(
                    408, "RequestTimeoutException",
                    f"the request headers did not arrive within intake.header_timeout "
                    f"({self.limits.header_timeout:g} s)"))
            elif reason == "body_timeout":
                self._fail_body(protocol, now - since)
            elif reason == "write_timeout":  # its answers were not read for idle_timeout: nothing more to do
                self.hang_up(protocol, reason, None)

    def _fail_body(self, protocol: IntakeProtocol, waited: float) -> None:
        if waited >= 2 * self.limits.body_timeout:  # the handler did not answer the first time
            self.hang_up(protocol, "body_timeout", None)
            return
        if protocol.fail_body(BodyTimeout(
                f"the request body did not arrive within intake.body_timeout ({self.limits.body_timeout:g} s)")):
            self.observer.connection_closed("body_timeout", len(self._order), self.limits.max_connections)


class _Sweeper:
    """The task that applies the timeouts (``Connections.sweep``) every interval; a crash ends ``alive``."""

    def __init__(self, pool: Connections, clock: Callable[[], float]) -> None:
        self.pool = pool
        self._clock = clock
        self._task = supervise(pool.loop.create_task(self._sweep_forever()), self._crashed)

    @property
    def alive(self) -> bool:
        return not self._task.done()

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _sweep_forever(self) -> None:
        limits = self.pool.limits
        interval = min(SWEEP_INTERVAL, limits.header_timeout / 4, limits.body_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            self.pool.sweep(self._clock())

    def _crashed(self, exc: BaseException) -> None:
        self.pool.observer.log.error("intake_sweep_crashed", error=repr(exc), exc_info=exc)


class _Acceptor:
    """One listening socket: accepts in batches, applies the limit, hands sockets to the loop."""

    def __init__(self, pool: Connections, sock: socket.socket, server: web.Server,
                 tls: ssl.SSLContext | None) -> None:
        self.pool = pool
        self.sock = sock
        self.server = server
        self.tls = tls
        self._fd = sock.fileno()
        self._reading = False
        self._retry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.pool.loop.add_reader(self._fd, self._accept)
        self._reading = True

    def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self._reading:
            self.pool.loop.remove_reader(self._fd)
            self._reading = False
        self.sock.close()

    def _pause(self, delay: float) -> None:
        self.pool.loop.remove_reader(self._fd)
        self._reading = False
        self._retry = self.pool.loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self.sock.fileno() != -1:
            self.start()

    def _accept(self) -> None:
        pool = self.pool
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                self._accept_failed(e)
                return
            if not pool.make_room():
                self._refuse(conn)
                continue
            conn.setblocking(False)
            protocol = IntakeProtocol(self.server, pool, pool.limits.idle_timeout, pool.limits.max_header_bytes)
            pool.add(protocol)
            protocol.accept_task = supervise(pool.loop.create_task(self._connect(conn, protocol)), self._crashed)

    def _accept_failed(self, e: OSError) -> None:
        pool = self.pool
        pool.observer.accept_failed(e, pool.count, pool.limits.max_connections)
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # Descriptors are short although the limit should leave room (other
            # files of the process?): free one if anything is idle, else wait.
            self._pause(0 if pool.evict() else ACCEPT_RETRY_DELAY)

    def _refuse(self, conn: socket.socket) -> None:
        """At the limit with every connection busy: a 503 (plain HTTP) and close, nothing held."""
        self.pool.refused()
        try:
            if self.tls is None:
                conn.setblocking(False)
                conn.send(raw_error(503, "ServiceUnavailableException",
                                    "the forwarder is at intake.max_connections with every connection busy; "
                                    "retry shortly"))
        except OSError:
            pass
        conn.close()

    async def _connect(self, conn: socket.socket, protocol: IntakeProtocol) -> None:
        try:
            await self.pool.loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.tls,
                ssl_handshake_timeout=self.pool.limits.header_timeout if self.tls else None)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
            # A failed or timed-out TLS handshake, or a peer gone before set-up.
            self.pool.forget(protocol)
            conn.close()
            if self.tls is not None:
                self.pool.observer.tls_handshake_failed(e)
        except BaseException:
            self.pool.forget(protocol)
            conn.close()
            raise
        finally:
            protocol.accept_task = None

    def _crashed(self, exc: BaseException) -> None:
        self.pool.observer.limited("error", "intake_accept_crashed", error=repr(exc), exc_info=exc)
