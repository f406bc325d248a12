"""The emulator's HTTP server: PutProjectEvents, the ``/_emulator/*`` control API, ``/healthz``.

Only wiring: what to answer is decided in ``decisions`` and ``faults``. Every
answer carries ``x-amzn-RequestId`` (the AWS SDKs' request id), and every error,
the control API's and unknown paths included, is AWS style (``x-amzn-ErrorType``
and a JSON ``message``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from forwarder.protocol import (
    PUT_PATH_PREFIX,
    ProtocolError,
    error_response,
    project_from_raw_path,
    protocol_error_response,
)

from .decisions import (
    ERROR_MESSAGES,
    MAX_BODY_BYTES,
    THROTTLING,
    EventIds,
    access_key_from_headers,
    body_too_large,
    event_error_codes,
    invalid,
    parse_events,
    rejected_index,
    verify_signature,
)
from forwarder.sigv4 import Verifier

from .faults import FaultConfig, TokenBucket, bucket_capacity, normalize_fault_fields
from .records import AcceptedEvent, KeyStats, Stats

REQUEST_ID = "x-amzn-RequestId"
DEFAULT_REGION = "us-east-1"
# What aiohttp's own refusals (no such path, wrong method) are called in AWS style.
_HTTP_ERROR_TYPES = {404: "UnknownOperationException", 405: "UnknownOperationException"}


class Emulator:
    """An Evidently PutProjectEvents endpoint with faults, counters and a control API.

    With ``credentials`` (access key id -> secret) every SigV4 signature is
    verified, scoped to ``region``, against ``wall_clock``; without, only its form.
    """

    def __init__(self, faults: FaultConfig | None = None, clock: Callable[[], float] = time.monotonic, *,
                 credentials: Mapping[str, str] | None = None, region: str = DEFAULT_REGION,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.faults = FaultConfig()
        self._clock = clock
        self._verifier = Verifier(credentials, region, clock=wall_clock) if credentials else None
        self._rng = random.Random()
        self._bucket: TokenBucket | None = None
        self._missing: frozenset[str] = frozenset()
        self._denied: frozenset[str] = frozenset()
        self.configure(**dataclasses.asdict(faults or FaultConfig()))
        self.accepted: list[AcceptedEvent] = []
        self.stats = Stats()
        self._seen: set[int] = set()  # hashes of accepted events, only while recording
        self._ids = EventIds()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.url = ""
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_aws_errors])
        app.on_response_prepare.append(_add_request_id)
        app.router.add_post(PUT_PATH_PREFIX + "{project:.*}", self._put_project_events)
        app.router.add_get("/_emulator/events", self._get_events)
        app.router.add_get("/_emulator/stats", self._get_stats)
        app.router.add_get("/_emulator/config", self._get_config)
        app.router.add_post("/_emulator/config", self._post_config)
        app.router.add_post("/_emulator/reset", self._post_reset)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port) and return the bound port."""
        # In-flight requests are only emulator latency sleeps: not worth waiting for.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        self.port = runner.addresses[0][1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        self.url = f"http://{shown}:{self.port}"
        return self.port

    async def close(self) -> None:
        """Stop listening; safe to call more than once."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def configure(self, **fields: Any) -> None:
        """Change faults at once, as ``POST /_emulator/config``; ValueError names a bad field."""
        changes = normalize_fault_fields(fields)
        self.faults = dataclasses.replace(self.faults, **changes)
        if "seed" in changes:
            self._rng = random.Random(self.faults.seed)
        if "quota" in changes or "quota_burst" in changes:
            # A new quota starts with a full bucket, as after a quota increase.
            quota = self.faults.quota
            self._bucket = TokenBucket(quota, bucket_capacity(self.faults), self._clock()) if quota else None
        self._missing = frozenset(self.faults.missing_projects)
        self._denied = frozenset(self.faults.denied_projects)

    def reset(self) -> None:
        """Forget accepted events and counters (faults stay)."""
        self.accepted.clear()
        self._seen.clear()
        self.stats = Stats()

    def stats_dict(self) -> dict[str, Any]:
        return self.stats.as_dict()

    # --- PutProjectEvents ---

    async def _put_project_events(self, request: web.Request) -> web.Response:
        body = await _read_body(request)
        response = self._answer(request.method, request.raw_path, request.headers, body)
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)
        return response

    def _answer(self, method: str, raw_path: str, headers: Any, body: bytes | ProtocolError) -> web.Response:
        stats = self.stats
        stats.requests_total += 1
        batch = stats.requests_total
        faults = self.faults
        if isinstance(body, ProtocolError):  # refused at the door, before anything else
            return self._refuse(body)
        try:
            access_key = access_key_from_headers(headers)
            if self._verifier is not None:
                verify_signature(self._verifier, method, raw_path, headers, body)
        except ProtocolError as err:
            return self._refuse(err)
        key_stats = stats.key(access_key)
        key_stats.requests += 1
        if faults.down:
            return self._refuse(ProtocolError(503, "ServiceUnavailableException", "Service is unavailable"))
        if self._bucket is not None and not self._bucket.take(self._clock()):
            stats.throttled_requests += 1
            key_stats.throttled += 1
            return self._refuse(ProtocolError(429, THROTTLING, "Rate exceeded"))
        if faults.error_rate and self._rng.random() < faults.error_rate:
            return self._refuse(ProtocolError(500, "InternalServerException", "Internal server error (injected)"))
        try:
            project = project_from_raw_path(raw_path)
            if project in self._missing:
                raise ProtocolError(404, "ResourceNotFoundException", f"Project {project} does not exist")
            if project in self._denied:
                raise ProtocolError(403, "AccessDeniedException", f"Access to project {project} is denied")
            events = parse_events(body)
            index = rejected_index(events, faults.reject_marker)
            if index is not None:
                raise invalid(f"events[{index}].data was rejected by the service")
        except ProtocolError as err:
            return self._refuse(err)
        return self._accept(project, events, access_key, key_stats, batch)

    def _refuse(self, err: ProtocolError) -> web.Response:
        self.stats.requests_by_status[err.status] += 1
        return protocol_error_response(err)

    def _accept(
        self, project: str, events: list[dict[str, Any]], access_key: str, key_stats: KeyStats, batch: int
    ) -> web.Response:
        faults = self.faults
        stats = self.stats
        codes = event_error_codes(events, faults.invalid_event_rate, faults.throttle_event_rate, self._rng)
        next_id = self._ids.next
        if codes is None:
            kept = events
            results = [{"eventId": next_id()} for _ in events]
        else:
            kept, results = [], []
            for event, code in zip(events, codes):
                if code is None:
                    kept.append(event)
                    results.append({"eventId": next_id()})
                else:
                    stats.events_failed_by_code[code] += 1
                    results.append({"errorCode": code, "errorMessage": ERROR_MESSAGES[code]})
        if faults.record:
            self._record(project, kept, access_key, batch)
        n_kept = len(kept)
        stats.requests_by_status[200] += 1
        stats.batch_sizes[len(events)] += 1
        stats.events_accepted += n_kept
        stats.events_by_project[project] += n_kept
        key_stats.accepted_events += n_kept
        body = {"eventResults": results, "failedEventCount": len(events) - n_kept}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def _record(self, project: str, events: list[dict[str, Any]], access_key: str, batch: int) -> None:
        now = time.time()
        seen, append = self._seen, self.accepted.append
        for event in events:
            data, timestamp, type_ = event["data"], event["timestamp"], event["type"]
            digest = hash((project, data, timestamp, type_))
            if digest in seen:
                self.stats.duplicates += 1
            else:
                seen.add(digest)
            append(AcceptedEvent(project, data, timestamp, type_, batch, now, access_key))

    # --- control API ---

    async def _get_events(self, request: web.Request) -> web.Response:
        project = request.query.get("project")
        events = self.accepted if project is None else [e for e in self.accepted if e.project == project]
        return _json({"events": events})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json(self.stats_dict())

    async def _get_config(self, request: web.Request) -> web.Response:
        return _json(self.faults)

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            fields = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            fields = None
        if type(fields) is not dict:
            return error_response(400, "ValidationException", "config body must be a JSON object of fault fields")
        try:
            self.configure(**fields)
        except ValueError as err:
            return error_response(400, "ValidationException", str(err))
        return _json(self.faults)

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json({"reset": True})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})


async def _read_body(request: web.Request) -> bytes | ProtocolError:
    """The body, or the 413 for one over MAX_BODY_BYTES (checked before it is read when announced)."""
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        return body_too_large(length)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:  # chunked: read() stops at client_max_size
        return body_too_large(None)


@web.middleware
async def _aws_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, ...) answered in AWS style."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_type = _HTTP_ERROR_TYPES.get(exc.status, "ValidationException" if exc.status < 500
                                           else "InternalServerException")
        return error_response(exc.status, error_type, f"{exc.reason}: {request.method} {request.path}")


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID not in response.headers:
        response.headers[REQUEST_ID] = str(uuid.uuid4())


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")
