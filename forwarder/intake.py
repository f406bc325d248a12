"""The intake: an Evidently-compatible HTTP API that validates, encodes and buffers.

It answers as soon as the events are in the buffer (committed, for the disk
buffer). Each request's events are taken all or none by the buffer; the 200
reports per-event results in request order, so one bad event never costs the
good ones beside it. A boto3 ``evidently`` client pointed here with
``inject_host_prefix=False`` just works; its SigV4 signature is checked when
``intake.auth = "sigv4"`` (auth.py), and ignored otherwise. Every answer, 200s
included, carries ``x-amzn-RequestId``; every error answer is AWS style and
counted in ``forwarder_events_rejected_total{reason}``.

Listeners (TCP, TLS, a Unix socket) are in listeners.py; connection limits,
timeouts and header bounds in server.py; the header checks a POST passes before
its body is read in intake_checks.py.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
import uuid
from typing import Callable, Protocol

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import istr
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .intake_checks import ContentTypes, HostCheck, Refusal, browser_refusal, decode_body
from .buffer import Buffer, BufferFull
from .config import IntakeConfig
from .events import (WIRE_FAST_PATH_MIN_BYTES, EventError, encode_all, encode_wire_body, ndjson_events,
                     request_events)
from .listeners import Listeners
from .observability import Observer
from .protocol import PUT_PATH_PREFIX, ProtocolError, error_response, project_error, project_from_raw_path, request_id
from .server import BodyTimeout, Connections

REQUEST_ID = istr("x-amzn-RequestId")  # istr: multidict skips case-folding it on every answer
PROJECT_CACHE_SIZE = 1024  # validated request paths kept: most requests repeat a few paths


class Authenticator(Protocol):
    """What intake.auth plugs in: None to let a request through, or the answer refusing it."""

    def __call__(self, request: web.BaseRequest, body: bytes) -> web.Response | None: ...


class _EventIds:
    """UUID-shaped event ids, unique per daemon run: a random prefix, a request
    counter and the event's index. Whole answers come from a cached template per
    event count with the request number patched in, instead of building each
    id (docs/intake.md, "Why a low-level server...")."""

    _REQUEST = b"\x00REQUEST\x00"  # where each answer gets its request number
    MAX_TEMPLATED = 4096

    def __init__(self) -> None:
        self._prefix = str(uuid.uuid4())[:24]  # 8-4-4-4- : the last group is ours
        self._requests = itertools.count()
        self._templates: dict[int, bytes] = {}

    def _template(self, n: int) -> bytes:
        ids = b",".join(b'{"eventId":"%s%s%04x"}' % (self._prefix.encode(), self._REQUEST, i) for i in range(n))
        return b'{"eventResults":[' + ids + b'],"failedEventCount":0}'

    def all_accepted(self, n: int) -> bytes:
        """The answer for a request whose ``n`` events were all accepted."""
        template = self._templates.get(n)
        if template is None:
            template = self._template(n)
            if n <= self.MAX_TEMPLATED:
                self._templates[n] = template
        return template.replace(self._REQUEST, b"%08x" % (next(self._requests) & 0xFFFFFFFF))

    def one_request(self) -> Callable[[int], str]:
        """Ids for a request with rejected events: one request number, index by index."""
        base = f"{self._prefix}{next(self._requests) & 0xFFFFFFFF:08x}"
        return lambda i: f"{base}{i:04x}"


def metrics_response(registry: CollectorRegistry) -> web.Response:
    resp = web.Response(body=generate_latest(registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    resp.headers[REQUEST_ID] = request_id()
    return resp


class Health(Protocol):
    """What /healthz and /readyz report: the pipeline's, not only the intake's."""

    def alive(self) -> bool: ...

    def not_ready(self) -> str | None:
        """Why new events should go elsewhere now, or None."""


class Intake:
    """The HTTP server on the configured listeners and its routes."""

    def __init__(self, config: IntakeConfig, default_project: str, buffer: Buffer, observer: Observer,
                 health: Health, registry: CollectorRegistry | None, wall: Callable[[], float] = time.time,
                 upstream_connections: int = 0) -> None:
        self._config = config
        self._default_project = default_project
        self._buffer = buffer
        self._observer = observer
        self._health = health
        self._registry = registry
        self._wall = wall
        self._ids = _EventIds()
        self._projects: dict[str, str] = {}  # raw path -> validated project
        self._content_types = ContentTypes()
        self._hosts = HostCheck(config.host)
        self.accepting = True
        # Authentication (intake.auth) plugs in here: called with the raw body
        # (SigV4 signs its hash) after the header checks and before anything is
        # decoded or buffered.
        self.authenticate: Authenticator | None = None
        self._gets = {"/healthz": self._healthz, "/readyz": self._readyz}
        if registry is not None:
            self._gets["/metrics"] = self._metrics
        self._listeners = Listeners(config, observer, upstream_connections)

    async def start(self) -> int:
        """Listen; returns the bound TCP port (useful with port 0), 0 without a TCP listener."""
        self._loop = asyncio.get_running_loop()
        return await self._listeners.start(self._server)

    @property
    def port(self) -> int:
        return self._listeners.port

    @property
    def connections(self) -> Connections | None:
        """The open connections (None before start and after close)."""
        return self._listeners.connections

    def _server(self, check_host: bool) -> web.Server:
        # aiohttp's low-level server with our own routing: web.Application adds a
        # router, a middleware chain and a web.Request with match info to every
        # request, a visible share of a single-event request's CPU (docs/intake.md).
        # Six fixed routes need none of that.
        return web.Server(functools.partial(self._route, check_host), request_factory=self._make_request)

    def _make_request(self, message, payload, protocol, writer, task):  # type: ignore[no-untyped-def]
        self._listeners.connections.touch(protocol)  # type: ignore[union-attr]
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop,
                               client_max_size=self._config.max_body_bytes)

    def reload_tls(self) -> bool:
        """Re-read intake.tls_cert_file and intake.tls_key_file (SIGHUP); keeps the old pair on error."""
        return self._listeners.reload_tls()

    async def _route(self, check_host: bool, request: web.BaseRequest) -> web.StreamResponse:
        # One coroutine per request from here on: each nested handler coroutine
        # is a measurable cost on a single-event request (docs/intake.md).
        try:
            if check_host:
                self._hosts.check(request.headers.get(hdrs.HOST))
            method, path = request.method, request.path
            if request.raw_path[:1] != "/":
                self._observer.events_rejected("validation", 1)
                return error_response(400, "ValidationException",
                                      f"the request target must be a path such as {PUT_PATH_PREFIX}{{project}}, "
                                      f"got {request.raw_path[:100]!r} (absolute-form targets are for proxies)")
            if path.startswith(PUT_PATH_PREFIX) or path == "/events/projects":
                if method == "POST":
                    project = self._project(request.raw_path)
                    if type(project) is not str:
                        return project  # type: ignore[return-value]
                    return await self._accept(request, project)  # type: ignore[arg-type]
            elif path == "/events":
                if method == "POST":
                    if project_error(self._default_project) is not None:
                        self._observer.events_rejected("validation", 1)
                        return error_response(400, "ValidationException",
                                              "project is required: POST /events/projects/{project}, or set "
                                              "evidently.default_project to use POST /events")
                    return await self._accept(request, self._default_project)
            elif path in self._gets:
                if method in ("GET", "HEAD"):
                    return await self._gets[path](request)
                self._observer.events_rejected("unknown_operation", 1)
                return error_response(405, "MethodNotAllowedException", f"{method} {path}: use GET",
                                      {"Allow": "GET, HEAD"})
            else:
                self._observer.events_rejected("unknown_operation", 1)
                return error_response(404, "UnknownOperationException", f"no operation at {path}")
            self._observer.events_rejected("unknown_operation", 1)
            return error_response(405, "MethodNotAllowedException", f"{method} {path}: use POST", {"Allow": "POST"})
        except Refusal as e:
            self._observer.events_rejected(e.reason, 1)
            response = error_response(e.status, e.error_type, e.message)
            if e.status == 408:  # the rest of that body is not awaited
                response.force_close()
            return response
        except ConnectionError:  # the client left: aiohttp drops the connection quietly
            raise
        except Exception as e:  # a bug: still an AWS-style answer, and a (rate-limited) traceback
            self._observer.events_rejected("internal_error", 1)
            self._observer.limited("error", "intake_internal_error", error=repr(e), exc_info=e)
            return error_response(500, "InternalServerException",
                                  f"the forwarder failed on this request ({type(e).__name__}); see its log")

    def stop_accepting(self) -> None:
        """New events get 503 from now on; health and metrics keep answering."""
        self.accepting = False

    async def close(self) -> None:
        """Stop listening, let requests in progress finish, remove the Unix socket (idempotent)."""
        await self._listeners.close()

    # handlers

    def _project(self, raw_path: str) -> str | web.Response:
        """The project of a PutProjectEvents path, or the error answer."""
        project = self._projects.get(raw_path)
        if project is None:
            try:
                project = project_from_raw_path(raw_path)
            except ProtocolError as e:
                self._observer.events_rejected("validation", 1)
                return error_response(e.status, e.error_type, e.message)
            if len(self._projects) >= PROJECT_CACHE_SIZE:
                self._projects.clear()  # a bound, not an LRU: valid paths come back at once
            self._projects[raw_path] = project
        return project

    async def _accept(self, request: web.BaseRequest, project: str) -> web.Response:
        if not self.accepting:
            self._observer.events_rejected("draining", 1)
            return error_response(503, "ServiceUnavailableException", "the forwarder is shutting down",
                                  {"Retry-After": "5"})
        headers = request.headers
        origin = headers.get(hdrs.ORIGIN)
        if origin is not None:
            raise browser_refusal(origin)
        content_type = headers.get(hdrs.CONTENT_TYPE)
        kind = self._content_types.known.get(content_type) or self._content_types.kind(content_type)
        ndjson = kind == "ndjson"
        limit = self._config.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            self._observer.events_rejected("body_too_large", 1)
            return error_response(413, "PayloadTooLargeException",
                                  f"the request body is {length} bytes; intake.max_body_bytes is {limit}")
        try:  # inline, not a helper coroutine: one coroutine per request (docs/intake.md)
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # no Content-Length: read() enforces client_max_size
            raise Refusal(413, "PayloadTooLargeException", f"the request body exceeds intake.max_body_bytes ({limit})",
                          "body_too_large") from None
        except BodyTimeout as e:  # set by the connection sweep (server.py), which then closes the connection
            raise Refusal(408, "RequestTimeoutException", str(e), "body_timeout") from None
        except (RequestPayloadError, HttpProcessingError) as e:  # e.g. a malformed chunked encoding
            raise Refusal(400, "BadRequestException", f"the request body could not be read: {e}",
                          "malformed_http") from None
        if self.authenticate is not None:
            denied = self.authenticate(request, body)
            if denied is not None:
                return denied
        encoding = headers.get(hdrs.CONTENT_ENCODING)
        if encoding is not None:
            body = decode_body(body, encoding, limit)
        now = self._wall()
        fast = not ndjson and len(body) >= WIRE_FAST_PATH_MIN_BYTES
        encoded = encode_wire_body(body, now) if fast else None
        if encoded is not None:
            n, errors = len(encoded), []
        else:
            try:
                events = ndjson_events(body) if ndjson else request_events(orjson.loads(body))
            except orjson.JSONDecodeError as e:
                self._observer.events_rejected("validation", 1)
                return error_response(400, "ValidationException", f"the request body is not valid JSON: {e}")
            except EventError as e:
                self._observer.events_rejected("validation", 1)
                return error_response(400, "ValidationException", str(e))
            n = len(events)
        most = self._config.max_events_per_request
        if n > most:
            self._observer.events_rejected("validation", n)
            return error_response(400, "ValidationException",
                                  f"events must hold at most {most} events (intake.max_events_per_request), "
                                  f"got {n}")
        if encoded is None:
            encoded, errors = encode_all(events, now)
        if encoded:
            try:
                await self._buffer.append(project, encoded, now)
            except BufferFull as e:
                self._observer.events_rejected("buffer_full", n)
                return error_response(429, "ThrottlingException", "the forwarder's buffer is full; retry later",
                                      {"Retry-After": str(max(1, round(e.retry_after)))})
            except Exception as e:  # e.g. a disk error: nothing was accepted, say so in AWS style
                self._observer.events_rejected("buffer_error", n)
                return error_response(503, "ServiceUnavailableException",
                                      f"the forwarder could not store the events: {type(e).__name__}",
                                      {"Retry-After": "5"})
            self._observer.events_received(len(encoded))
        if errors:
            self._observer.events_rejected("validation", len(errors))
        response = web.Response(body=self._results(n, errors), content_type="application/json")
        response.headers[REQUEST_ID] = request_id()
        return response

    def _results(self, n: int, errors: list[tuple[int, str]]) -> bytes:
        if not errors:
            return self._ids.all_accepted(n)
        failed = dict(errors)
        event_id = self._ids.one_request()
        results = [
            {"errorCode": "ValidationException", "errorMessage": failed[i]} if i in failed
            else {"eventId": event_id(i)}
            for i in range(n)
        ]
        return orjson.dumps({"eventResults": results, "failedEventCount": len(errors)})

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        if not self._health.alive():
            return _json({"status": "a pipeline task has stopped"}, 503)
        connections = self._listeners.connections
        if connections is not None and not connections.alive:
            return _json({"status": "the intake's connection sweep has stopped"}, 503)
        return _json({"status": "ok"})

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        if not self.accepting:
            # What is left to deliver, readable until the listener closes (a scrape may come too late).
            return _json({"status": "not ready", "reason": "draining", "queue_depth": self._buffer.depth}, 503)
        reason = self._health.not_ready()
        if reason is None:
            return _json({"status": "ready"})
        return _json({"status": "not ready", "reason": reason}, 503)

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        return metrics_response(self._registry)  # type: ignore[arg-type]


def _json(value: dict, status: int = 200) -> web.Response:
    response = web.Response(body=orjson.dumps(value), status=status, content_type="application/json")
    response.headers[REQUEST_ID] = request_id()
    return response
