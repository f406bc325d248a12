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

import time
from typing import Callable, Protocol

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry

from forwarder.intake.answers import REQUEST_ID, EventIds
from forwarder.buffer.contract import Buffer, BufferFull
from forwarder.config import IntakeConfig
from forwarder.intake.checks import (ContentTypes, HostCheck, ProjectPaths, Refusal, browser_refusal, decode_body,
                                     read_events, refuse_all)
from forwarder.intake.listeners import Listeners, TlsCertificates
from forwarder.observability import Observer
from forwarder.intake.probes import Health, Probes
from forwarder.evidently.protocol import PUT_PATH_PREFIX, error_response, project_error, region_error, request_id
from forwarder.intake.aiohttp_fence import BodyTimeout
from forwarder.intake.connections import Connections


class Authenticator(Protocol):
    """What intake.auth plugs in: None to let a request through, or the answer refusing it."""

    def __call__(self, request: web.BaseRequest, body: bytes) -> web.Response | None: ...


class Intake:
    """The HTTP server on the configured listeners and its routes."""

    def __init__(self, config: IntakeConfig, default_project: str, buffer: Buffer, observer: Observer,
                 health: Health, registry: CollectorRegistry | None, wall: Callable[[], float] = time.time,
                 upstream_connections: int = 0, region: str = "") -> None:
        self._config = config
        self._region = region  # evidently.region: an ARN naming another one is refused per event
        self._default_project = default_project
        self._buffer = buffer
        self._observer = observer
        self._wall = wall
        self._ids = EventIds()
        self._paths = ProjectPaths()
        self._content_types = ContentTypes()
        self._hosts = HostCheck(config.host)
        self.accepting = True
        # Authentication (intake.auth) plugs in here: called with the raw body
        # (SigV4 signs its hash) after the header checks and before anything is
        # decoded or buffered.
        self.authenticate: Authenticator | None = None
        self._listeners = Listeners(config, observer, upstream_connections)
        self._gets = Probes(health, buffer, self._listeners, registry, lambda: self.accepting).routes

    async def start(self) -> int:
        """Listen; returns the bound TCP port (useful with port 0), 0 without a TCP listener."""
        return await self._listeners.start(self._route)

    @property
    def port(self) -> int:
        return self._listeners.port

    @property
    def connections(self) -> Connections | None:
        """The open connections (None before start and after close)."""
        return self._listeners.connections

    @property
    def tls(self) -> TlsCertificates | None:
        """The certificates a reload re-reads (None without TLS)."""
        return self._listeners.tls

    def stop_accepting(self) -> None:
        """New events get 503 from now on; health and metrics keep answering."""
        self.accepting = False

    async def close(self) -> None:
        """Stop listening, let requests in progress finish, remove the Unix socket (idempotent)."""
        await self._listeners.close()

    async def _route(self, check_host: bool, request: web.BaseRequest) -> web.StreamResponse:
        # One coroutine per request from here on: each nested handler coroutine
        # is a measurable cost on a single-event request (docs/intake.md).
        try:
            if check_host:
                self._hosts.check(request.headers.get(hdrs.HOST))
            method, path, raw_path = request.method, request.path, request.raw_path
            if raw_path[:1] != "/":
                raise Refusal(400, "ValidationException",
                              f"the request target must be a path such as {PUT_PATH_PREFIX}{{project}}, "
                              f"got {raw_path[:100]!r} (absolute-form targets are for proxies)", "validation")
            if path.startswith(PUT_PATH_PREFIX) or path == "/events/projects":
                if method == "POST":
                    return await self._accept(request, self._paths.known.get(raw_path)
                                              or self._paths.project(raw_path))
            elif path == "/events":
                if method == "POST":
                    if project_error(self._default_project) is not None:
                        raise Refusal(400, "ValidationException", "project is required: POST "
                                      "/events/projects/{project}, or set evidently.default_project to use "
                                      "POST /events", "validation")
                    return await self._accept(request, self._default_project)
            elif path in self._gets:
                if method in ("GET", "HEAD"):
                    return await self._gets[path](request)
                raise Refusal(405, "MethodNotAllowedException", f"{method} {path}: use GET", "unknown_operation",
                              headers={"Allow": "GET, HEAD"})
            else:
                raise Refusal(404, "UnknownOperationException", f"no operation at {path}", "unknown_operation")
            raise Refusal(405, "MethodNotAllowedException", f"{method} {path}: use POST", "unknown_operation",
                          headers={"Allow": "POST"})
        except Refusal as e:
            self._observer.events_rejected(e.reason, e.count)
            response = error_response(e.status, e.error_type, e.message, e.headers)
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

    async def _accept(self, request: web.BaseRequest, project: str) -> web.Response:
        """PutProjectEvents: checks, body, authentication, events, buffer, answer (Refusal for whole refusals)."""
        if not self.accepting:
            raise Refusal(503, "ServiceUnavailableException", "the forwarder is shutting down", "draining",
                          headers={"Retry-After": "5"})
        headers = request.headers
        origin = headers.get(hdrs.ORIGIN)
        if origin is not None:
            raise browser_refusal(origin)
        content_type = headers.get(hdrs.CONTENT_TYPE)
        kind = self._content_types.known.get(content_type) or self._content_types.kind(content_type)
        limit = self._config.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise Refusal(413, "PayloadTooLargeException",
                          f"the request body is {length} bytes; intake.max_body_bytes is {limit}", "body_too_large")
        try:  # inline, not a helper coroutine: one coroutine per request (docs/intake.md)
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # no Content-Length: read() enforces client_max_size
            raise Refusal(413, "PayloadTooLargeException", f"the request body exceeds intake.max_body_bytes ({limit})",
                          "body_too_large") from None
        except BodyTimeout as e:  # set by the connection sweep (connections.py), which then closes the connection
            raise Refusal(408, "RequestTimeoutException", str(e), "body_timeout") from None
        except (web.RequestPayloadError, HttpProcessingError) as e:  # e.g. a malformed chunked encoding
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
        n, encoded, errors = read_events(body, kind == "ndjson", now, self._config.max_events_per_request)
        wrong_region = 0
        if project[:4] == "arn:" and self._region and (wrong := region_error(project, self._region)) is not None:
            wrong_region, encoded, errors = len(encoded), [], refuse_all(n, errors, wrong)
        append_id = 0
        if encoded:
            try:
                append_id = await self._buffer.append(project, encoded, now)
            except BufferFull as e:
                raise Refusal(429, "ThrottlingException", "the forwarder's buffer is full; retry later",
                              "buffer_full", n, {"Retry-After": str(max(1, round(e.retry_after)))}) from None
            except Exception as e:  # e.g. a disk error: nothing was accepted, say so in AWS style
                raise Refusal(503, "ServiceUnavailableException",
                              f"the forwarder could not store the events: {type(e).__name__}", "buffer_error", n,
                              {"Retry-After": "5"}) from None
            self._observer.events_received(len(encoded))
        if errors:
            self._observer.events_rejected("validation", len(errors) - wrong_region)
        if wrong_region:
            self._observer.events_rejected("wrong_region", wrong_region)
        response = web.Response(body=self._ids.results(n, errors, append_id), content_type="application/json")
        response.headers[REQUEST_ID] = request_id()
        return response
