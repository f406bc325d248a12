"""The only module that reads aiohttp's internals: the intake's HTTP/1.1 protocol.

aiohttp's ``RequestHandler`` (``web_protocol.py``) shows no public view of
what a connection is doing, and the intake needs one: its connection limit
evicts only connections with no request in progress, its sweep times out slow
heads and bodies (connections.py), and request heads are bounded in total. So
``IntakeProtocol`` subclasses it, reads the private attributes named in
``PRIVATE_ATTRIBUTES`` and overrides the hooks named in ``HOOKS``; the rest of
the intake sees only its public methods (``phase``, ``observe``,
``fail_body``, ``close_now``) and ``make_server``.

Those names change between aiohttp minors, so pyproject.toml bounds aiohttp
below the next one, ``missing_internals`` refuses to run on an aiohttp that
lacks them (checked when this module is imported), and
tests/intake/test_aiohttp_fence.py fails naming the attribute and the aiohttp
version when a release moved one.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
from typing import Any, Awaitable, Callable, Protocol

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from forwarder.evidently.protocol import error_response

# RequestHandler's private attributes read or set here.
PRIVATE_ATTRIBUTES = ("_messages", "_request_count", "_request_in_progress", "_max_msg_queue_size",
                      "_msg_queue_resume_size")
# Methods of aiohttp's classes this module overrides or calls that aiohttp does
# not document, with the parameters it relies on.
HOOKS: dict[tuple[type, str], tuple[str, ...]] = {
    (RequestHandler, "handle_error"): ("self", "request", "status", "exc", "message"),
    (RequestHandler, "log_exception"): ("self", "args", "kw"),
    (RequestHandler, "force_close"): ("self",),
    (web.Server, "pre_shutdown"): ("self",),
    # what a request_factory is called with
    (web.Server, "_make_request"): ("self", "message", "payload", "protocol", "writer", "task"),
}

# Requests parsed ahead of the one being handled (aiohttp's default is 32). A
# client pipelining without reading its answers stops being read beyond this,
# so queued request heads stay within a few times intake.max_header_bytes.
PIPELINE_DEPTH = 4


def missing_internals(handler: type = RequestHandler, server: type = web.Server) -> list[str]:
    """What this module relies on that the installed aiohttp lacks, one line each ([] when all is there)."""
    missing = [f"RequestHandler.{name}" for name in PRIVATE_ATTRIBUTES if not hasattr(handler, name)]
    classes = {RequestHandler: handler, web.Server: server}
    for (cls, name), params in HOOKS.items():
        method = getattr(classes[cls], name, None)
        if method is None:
            missing.append(f"{cls.__name__}.{name}")
        elif tuple(inspect.signature(method).parameters) != params:
            missing.append(f"{cls.__name__}.{name}{params} (found {tuple(inspect.signature(method).parameters)})")
    return [f"aiohttp {aiohttp.__version__} has no {what}" for what in missing]


if _missing := missing_internals():
    raise ImportError("forwarder/intake/aiohttp_fence.py reads aiohttp internals that moved: "
                      + "; ".join(_missing) + ". Install the aiohttp version pyproject.toml names.")


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


class BodyTimeout(Exception):
    """The request body did not arrive within intake.body_timeout."""


def http_error(exc: BaseException | None) -> tuple[int, str, str, str]:
    """(status, AWS error type, message, rejection reason) for a request aiohttp could not parse."""
    if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message):
        return (431, "RequestHeaderFieldsTooLargeException",
                f"the request line or a header is too large: {exc.message[:200]}", "headers_too_large")
    if isinstance(exc, HttpProcessingError):
        return 400, "BadRequestException", f"malformed HTTP request: {exc.message[:200]}", "malformed_http"
    return (500, "InternalServerException",
            "the forwarder failed while answering this request; see its log", "internal_error")


class Pool(Protocol):
    """What a connection tells the set of connections it belongs to (connections.Connections)."""

    loop: asyncio.AbstractEventLoop

    def forget(self, protocol: IntakeProtocol) -> None: ...

    def request_started(self, protocol: IntakeProtocol) -> None: ...

    def head_too_large(self, protocol: IntakeProtocol, size: int, answerable: bool) -> None: ...

    def rejected(self, reason: str, exc: BaseException | None = None) -> None: ...

    def internal_error(self, message: str, exc: BaseException | None) -> None: ...


class IntakeProtocol(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with a bound on request heads and a view of its state for the sweep."""

    __slots__ = ("_pool", "_max_head", "_head_bytes", "_body", "_seen", "_since", "accept_task", "peer")

    def __init__(self, manager: web.Server, pool: Pool, idle_timeout: float, max_header_bytes: int) -> None:
        # No TCP keep-alive probes: idle_timeout closes an idle connection long
        # before the kernel's first probe (2 h), and setting it costs each accept.
        super().__init__(manager, loop=pool.loop, keepalive_timeout=idle_timeout, access_log=None,
                         auto_decompress=False, tcp_keepalive=False)
        # Only the protocol's own pause/resume thresholds change: the parser
        # still stops at aiohttp's 32, but reading pauses from PIPELINE_DEPTH.
        self._max_msg_queue_size = PIPELINE_DEPTH
        self._msg_queue_resume_size = PIPELINE_DEPTH // 2
        self._pool = pool
        self._max_head = max_header_bytes
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

    @property
    def head_bytes(self) -> int:
        """Bytes of request heads received and not yet parsed into requests."""
        return self._head_bytes

    def observe(self, now: float) -> tuple[Phase, float]:
        """This connection's phase and since when the sweep has seen it in it (the same request)."""
        phase = self.phase
        seen = (phase, self._request_count)
        if seen != self._seen:
            self._seen, self._since = seen, now
        return phase, self._since

    # What the intake does to it.

    def fail_body(self, error: BodyTimeout) -> bool:
        """Make the handler's wait for the rest of the body raise ``error``; False if it already failed."""
        body = self._body
        if body is None or body.exception() is not None:
            return False
        body.set_exception(error)
        return True

    def close_now(self, answer: bytes | None) -> None:
        """Close the connection now, after ``answer`` if any (one still connecting: its set-up is cancelled)."""
        transport = self.transport
        if transport is None:
            if self.accept_task is not None:
                self.accept_task.cancel()
            return
        if answer is not None:
            transport.write(answer)
        # close() waits for the answer to be written; a peer that reads nothing
        # would keep the descriptor, so anything left unwritten is dropped.
        if answer is None or transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()
        self.force_close()

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
        self._head_bytes = 0
        # With a request in progress an answer is being written: just close.
        self._pool.head_too_large(self, size, answerable=not self._request_in_progress)

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
        self._pool.internal_error(str(args[0]) if args else "", kw.get("exc_info"))


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def make_server(handler: Handler, pool: Pool, client_max_size: int) -> web.Server:
    """aiohttp's low-level server for ``handler``; each request starting is told to ``pool`` (its idle order)."""

    def make_request(message, payload, protocol, writer, task):  # type: ignore[no-untyped-def]
        pool.request_started(protocol)
        return web.BaseRequest(message, payload, protocol, writer, task, pool.loop, client_max_size=client_max_size)

    return web.Server(handler, request_factory=make_request)


async def shut_down(servers: list[web.Server], timeout: float) -> None:
    """Close the idle connections of ``servers``, then let requests in progress finish within ``timeout``."""
    for server in servers:
        server.pre_shutdown()
    await asyncio.gather(*(server.shutdown(timeout) for server in servers))
