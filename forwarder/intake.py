"""The intake: an Evidently-compatible HTTP API that validates, encodes and buffers.

It answers as soon as the events are in the buffer (committed, for the disk
buffer). Each request's events are taken all or none by the buffer; the 200
reports per-event results in request order, so one bad event never costs the
good ones beside it. A boto3 ``evidently`` client pointed here with
``inject_host_prefix=False`` just works; its SigV4 signature is checked when
``intake.auth = "sigv4"`` (auth.py), and ignored otherwise.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Callable, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .buffer import Buffer, BufferFull
from .config import IntakeConfig
from .events import (WIRE_FAST_PATH_MIN_BYTES, EventError, encode_all, encode_wire_body, ndjson_events,
                     request_events)
from .observability import Observer
from .protocol import PUT_PATH_PREFIX, ProtocolError, error_response, project_error, project_from_raw_path

NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonlines"})
PROJECT_CACHE_SIZE = 1024  # validated request paths kept (parsing one is ~1.5 us)


class Authenticator(Protocol):
    """What intake.auth plugs in: None to let a request through, or the answer refusing it."""

    def __call__(self, request: web.BaseRequest, body: bytes) -> web.Response | None: ...


class _EventIds:
    """UUID-shaped event ids, unique per daemon run: a random prefix, a request
    counter and the event's index. Whole answers come from a cached template per
    event count with the request number patched in: 19 -> 2 us for 50 events
    (a fresh uuid4 per event cost ~2 us each)."""

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
    return resp


class Intake:
    """The HTTP server on ``intake.host:intake.port`` and its routes."""

    def __init__(self, config: IntakeConfig, default_project: str, buffer: Buffer, observer: Observer,
                 alive: Callable[[], bool], not_ready: Callable[[], str | None],
                 registry: CollectorRegistry | None, wall: Callable[[], float] = time.time) -> None:
        self._config = config
        self._default_project = default_project
        self._buffer = buffer
        self._observer = observer
        self._alive = alive
        self._not_ready = not_ready
        self._registry = registry
        self._wall = wall
        self._ids = _EventIds()
        self._projects: dict[str, str] = {}  # raw path -> validated project
        self.accepting = True
        # Authentication (intake.auth) plugs in here: called with the raw body
        # (SigV4 signs its hash) after the header checks and before anything is
        # decoded or buffered.
        self.authenticate: Authenticator | None = None
        self._gets = {"/healthz": self._healthz, "/readyz": self._readyz}
        if registry is not None:
            self._gets["/metrics"] = self._metrics
        self._runner: web.ServerRunner | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        # aiohttp's low-level server with our own routing: a bare web.Application
        # handler costs ~42 us of CPU per single-event request on our 2-core
        # machine, the same handler on web.Server ~32 us (no router, middleware
        # chain or per-request web.Request with match info). Six fixed routes need
        # none of that.
        self._loop = asyncio.get_running_loop()
        server = web.Server(self._route, request_factory=self._make_request)
        self._runner = web.ServerRunner(server, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, self._config.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    def _make_request(self, message, payload, protocol, writer, task) -> web.BaseRequest:  # type: ignore[no-untyped-def]
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop,
                               client_max_size=self._config.max_body_bytes)

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        method, path = request.method, request.path
        # One coroutine per request from here on: each nested handler coroutine
        # cost ~0.4 us of a ~50 us single-event request.
        if path.startswith(PUT_PATH_PREFIX) or path == "/events/projects":
            if method == "POST":
                project = self._project(request.raw_path)
                if type(project) is not str:
                    return project  # type: ignore[return-value]
                return await self._accept(request, project, ndjson=False)  # type: ignore[arg-type]
        elif path == "/events":
            if method == "POST":
                if project_error(self._default_project) is not None:
                    self._observer.events_rejected("validation", 1)
                    return error_response(400, "ValidationException",
                                          "project is required: POST /events/projects/{project}, or set "
                                          "evidently.default_project to use POST /events")
                return await self._accept(request, self._default_project,
                                          ndjson=request.content_type in NDJSON_TYPES)
        elif path in self._gets:
            if method in ("GET", "HEAD"):
                return await self._gets[path](request)
            return error_response(405, "MethodNotAllowedException", f"{method} {path}: use GET", {"Allow": "GET, HEAD"})
        else:
            return error_response(404, "UnknownOperationException", f"no operation at {path}")
        return error_response(405, "MethodNotAllowedException", f"{method} {path}: use POST", {"Allow": "POST"})

    def stop_accepting(self) -> None:
        """New events get 503 from now on; health and metrics keep answering."""
        self.accepting = False

    async def close(self) -> None:
        """Stop listening (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

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

    async def _accept(self, request: web.BaseRequest, project: str, ndjson: bool) -> web.Response:
        if not self.accepting:
            self._observer.events_rejected("draining", 1)
            return error_response(503, "ServiceUnavailableException", "the forwarder is shutting down",
                                  {"Retry-After": "5"})
        limit = self._config.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            self._observer.events_rejected("body_too_large", 1)
            return error_response(413, "PayloadTooLargeException",
                                  f"the request body is {length} bytes; intake.max_body_bytes is {limit}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # no Content-Length: read() enforces client_max_size
            self._observer.events_rejected("body_too_large", 1)
            return error_response(413, "PayloadTooLargeException",
                                  f"the request body exceeds intake.max_body_bytes ({limit})")
        if self.authenticate is not None:
            denied = self.authenticate(request, body)
            if denied is not None:
                return denied
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
        return web.Response(body=self._results(n, errors), content_type="application/json")

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
        if self._alive():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "a pipeline task has stopped"}, status=503)

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        reason = "draining" if not self.accepting else self._not_ready()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        return metrics_response(self._registry)  # type: ignore[arg-type]
