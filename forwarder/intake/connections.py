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
import enum
import errno
import socket
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from forwarder.observability import Observer
from forwarder.evidently.protocol import error_response, request_id

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
# Requests parsed ahead of the one being handled (aiohttp's default is 32). A
# client pipelining without reading its answers stops being read beyond this,
# so queued request heads stay within a few times intake.max_header_bytes.
PIPELINE_DEPTH = 4


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


class Phase(enum.Enum):
    CONNECTING = "connecting"  # accepted; transport (TLS handshake) being set up
    IDLE = "idle"  # waiting for a request, no byte of it yet
    HEAD = "head"  # part of a request's headers received
    BODY = "body"  # headers done; the handler waits for the rest of the body
    BUSY = "busy"  # a request being handled, or parsed and queued
    WRITING = "writing"  # an answer not yet taken by the client (it does not read)

    @property
    def evictable(self) -> bool:
        """No request of this connection is in progress: closing it loses nothing accepted."""
        return self in (Phase.CONNECTING, Phase.IDLE, Phase.HEAD)


def overdue(phase: Phase, since: float, now: float, limits: Limits) -> str | None:
    """The timeout a connection in ``phase`` since ``since`` has run out at ``now``, or None."""
    if phase is Phase.HEAD and now - since >= limits.header_timeout:
        return "header_timeout"
    if phase is Phase.BODY and now - since >= limits.body_timeout:
        return "body_timeout"
    if phase is Phase.WRITING and now - since >= limits.idle_timeout:
        return "write_timeout"
    return None


def http_error(exc: BaseException | None) -> tuple[int, str, str, str]:
    """(status, AWS error type, message, rejection reason) for a request aiohttp could not parse."""
    if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message):
        return (431, "RequestHeaderFieldsTooLargeException",
                f"the request line or a header is too large: {exc.message[:200]}", "headers_too_large")
    if isinstance(exc, HttpProcessingError):
        return 400, "BadRequestException", f"malformed HTTP request: {exc.message[:200]}", "malformed_http"
    return (500, "InternalServerException",
            "the forwarder failed while answering this request; see its log", "internal_error")


def raw_error(status: int, error_type: str, message: str) -> bytes:
    """A whole AWS-style error answer that closes the connection, for when no request object exists."""
    body = orjson.dumps({"message": message})
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"x-amzn-ErrorType: {error_type}\r\nx-amzn-RequestId: {request_id()}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class BodyTimeout(Exception):
    """The request body did not arrive within intake.body_timeout."""


class IntakeProtocol(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with a bound on request heads and the state the sweep reads.

    It reads aiohttp 3.14's RequestHandler internals (``_messages``,
    ``_request_count``, ``_request_in_progress``, the queue thresholds);
    tests/intake/test_connections.py exercises each of them.
    """

    __slots__ = ("_pool", "_max_head", "_head_bytes", "_body", "_seen", "_since", "accept_task", "peer")

    def __init__(self, manager: web.Server, pool: "Connections", **kwargs: Any) -> None:
        # No TCP keep-alive probes: idle_timeout closes an idle connection long
        # before the kernel's first probe (2 h), and setting it costs each accept.
        super().__init__(manager, loop=pool.loop, keepalive_timeout=pool.limits.idle_timeout, access_log=None,
                         auto_decompress=False, tcp_keepalive=False, **kwargs)
        # Only the protocol's own pause/resume thresholds change: the parser
        # still stops at aiohttp's 32, but reading pauses from PIPELINE_DEPTH.
        self._max_msg_queue_size = PIPELINE_DEPTH
        self._msg_queue_resume_size = PIPELINE_DEPTH // 2
        self._pool = pool
        self._max_head = pool.limits.max_header_bytes
        self._head_bytes = 0  # bytes of request heads not yet parsed into requests
        self._body: Any = None  # payload of the last request whose head was parsed
        self._seen: tuple[Phase, int] | None = None  # what the sweep saw last, and since when
        self._since = 0.0
        self.accept_task: asyncio.Task[None] | None = None
        self.peer: Any = None  # the client certificate's verdict, kept by intake/auth.py (auth = "mtls")

    # The state of this connection, as the sweep and the limit read it.

    @property
    def phase(self) -> Phase:
        transport = self.transport
        if transport is None:
            return Phase.CONNECTING
        if self.writing_paused:  # the client stopped reading: a handler may wait on it for ever
            return Phase.WRITING
        if self._request_in_progress or self._messages:
            body = self._body
            if not self._messages and body is not None and not body.is_eof():
                return Phase.BODY
            return Phase.BUSY
        # Closing such a connection could lose the answer to events already accepted.
        if transport.get_write_buffer_size():
            return Phase.WRITING
        return Phase.HEAD if self._head_bytes else Phase.IDLE

    def observe(self, now: float) -> tuple[Phase, float]:
        """This connection's phase and since when the sweep has seen it in it (the same request)."""
        phase = self.phase
        seen = (phase, self._request_count)
        if seen != self._seen:
            self._seen, self._since = seen, now
        return phase, self._since

    # aiohttp hooks

    def connection_lost(self, exc: BaseException | None) -> None:
        self._pool.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Bytes that arrive while no body is being read belong to a request
        # head. (What follows the end of a body in the same read is not counted:
        # at most one read, which the parser holds until that head completes.)
        body = self._body
        in_head = body is None or body.is_eof()
        count = self._request_count
        RequestHandler.data_received(self, data)
        limit = self._max_head
        if self._request_count != count:  # one or more heads completed
            heads, self._head_bytes = self._head_bytes + len(data), 0
            self._body = self._messages[-1][1] if self._messages else None
            # The read held more than a head's worth: measure the heads it completed.
            if heads > limit and (largest := self._largest_new_head(count)) > limit:
                self._refuse_head(largest)
        elif in_head:
            heads = self._head_bytes + len(data)
            if heads > limit:
                self._refuse_head(heads)
            else:
                self._head_bytes = heads

    def _largest_new_head(self, before: int) -> int:
        """Bytes of the largest request head parsed since request number ``before``."""
        new = self._request_count - before
        return max((len(msg.path) + sum(len(k) + len(v) + 4 for k, v in msg.raw_headers)
                    for msg, _ in list(self._messages)[-new:] if hasattr(msg, "raw_headers")), default=0)

    def _refuse_head(self, size: int) -> None:
        limit = self._max_head
        self._head_bytes = 0
        answer = None
        if not self._request_in_progress:  # otherwise an answer is being written: just close
            answer = raw_error(431, "RequestHeaderFieldsTooLargeException",
                               f"the request head is more than {size} bytes; intake.max_header_bytes is {limit}")
        self._pool.hang_up(self, "headers_too_large", answer)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Every answer aiohttp makes on its own (malformed HTTP, a failed handler) in AWS style."""
        status, error_type, text, reason = http_error(exc)
        self._pool.rejected(reason, exc if status == 500 else None)
        if request.writer.output_size > 0:  # as aiohttp: the answer has begun, the connection is lost
            raise ConnectionError("an answer was already being sent")
        response = error_response(status, error_type, text)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if isinstance(kw.get("exc_info"), BodyTimeout):  # aiohttp reading the rest of a timed-out body
            return
        self._pool.observer.limited("error", "intake_internal_error", message=str(args[0]) if args else "",
                                    exc_info=kw.get("exc_info"))


class Connections:
    """Every intake connection, across listeners: the limit, the idle order, the sweep."""

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
        for acceptor in listeners:
            acceptor.server.pre_shutdown()
        await asyncio.gather(*(acceptor.server.shutdown(timeout) for acceptor in listeners))

    # bookkeeping

    def add(self, protocol: IntakeProtocol) -> None:
        self._order[protocol] = None

    def forget(self, protocol: IntakeProtocol) -> None:
        self._order.pop(protocol, None)

    def touch(self, protocol: RequestHandler) -> None:
        """A request starts on ``protocol``: it becomes the most recently active."""
        try:
            self._order.move_to_end(protocol)  # type: ignore[arg-type]
        except KeyError:  # evicted or lost while its request was queued
            pass

    def rejected(self, reason: str, exc: BaseException | None = None) -> None:
        self.observer.events_rejected(reason, 1)
        if exc is not None:
            self.observer.limited("error", "intake_internal_error", error=repr(exc), exc_info=exc)

    # the limit

    def make_room(self) -> bool:
        """True when one more connection fits, after closing the longest-idle one if needed."""
        if len(self._order) < self.limits.max_connections:
            return True
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
        _close_at_once(protocol, answer)

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
        body = protocol._body
        if body is not None and body.exception() is None:
            self.observer.connection_closed("body_timeout", len(self._order), self.limits.max_connections)
            body.set_exception(BodyTimeout(
                f"the request body did not arrive within intake.body_timeout ({self.limits.body_timeout:g} s)"))


def _close_at_once(protocol: IntakeProtocol, answer: bytes | None) -> None:
    """Close ``protocol``'s connection now, after ``answer`` if any (one still connecting: its set-up is cancelled)."""
    transport = protocol.transport
    if transport is None:
        if protocol.accept_task is not None:
            protocol.accept_task.cancel()
        return
    if answer is not None:
        transport.write(answer)
    # close() waits for the answer to be written; a peer that reads nothing
    # would keep the descriptor, so anything left unwritten is dropped.
    if answer is None or transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()
    protocol.force_close()


class _Sweeper:
    """The task that applies the timeouts (``Connections.sweep``) every interval; a crash ends ``alive``."""

    def __init__(self, pool: Connections, clock: Callable[[], float]) -> None:
        self.pool = pool
        self._clock = clock
        self._task = pool.loop.create_task(self._sweep_forever())
        self._task.add_done_callback(self._done)

    @property
    def alive(self) -> bool:
        return not self._task.done()

    async def stop(self) -> None:
        self._task.remove_done_callback(self._done)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _sweep_forever(self) -> None:
        limits = self.pool.limits
        interval = min(SWEEP_INTERVAL, limits.header_timeout / 4, limits.body_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            self.pool.sweep(self._clock())

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.pool.observer.log.error("intake_sweep_crashed", error=repr(task.exception()),
                                         exc_info=task.exception())


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
            protocol = IntakeProtocol(self.server, pool)
            pool.add(protocol)
            protocol.accept_task = task = pool.loop.create_task(self._connect(conn, protocol))
            task.add_done_callback(self._connected)

    def _accept_failed(self, e: OSError) -> None:
        pool = self.pool
        pool.observer.accept_failed(e, pool.count, pool.limits.max_connections)
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # Descriptors are short although the limit should leave room (other
            # files of the process?): free one if anything is idle, else wait.
            victim = pool._longest_idle()
            if victim is not None:
                pool.hang_up(victim, "evicted", None)
            self._pause(0 if victim is not None else ACCEPT_RETRY_DELAY)

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

    def _connected(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.pool.observer.limited("error", "intake_accept_crashed", error=repr(task.exception()),
                                       exc_info=task.exception())
