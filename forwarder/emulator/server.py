"""The emulator's HTTP server: PutProjectEvents, the ``/_emulator/*`` control API, ``/healthz``.

Only wiring: PutProjectEvents is answered by ``put_events``, on the faults in
force (``faults``). Every answer carries ``x-amzn-RequestId`` (the AWS SDKs'
request id), and every error, the control API's and unknown paths included, is
AWS style (``x-amzn-ErrorType`` and a JSON ``message``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from forwarder.evidently.protocol import PUT_PATH_PREFIX, ProtocolError, error_response
from forwarder.evidently.sigv4 import Verifier

from forwarder.emulator.decisions import MAX_BODY_BYTES, body_too_large
from forwarder.emulator.faults import FaultConfig, FaultState
from forwarder.emulator.put_events import PutProjectEvents
from forwarder.emulator.records import AcceptedEvent, Stats

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
        self._faults = FaultState(clock)
        self._faults.configure(dataclasses.asdict(faults or FaultConfig()))
        verifier = Verifier(credentials, region, clock=wall_clock) if credentials else None
        self._put = PutProjectEvents(self._faults, verifier)
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

    @property
    def faults(self) -> FaultConfig:
        """The faults in force."""
        return self._faults.config

    @property
    def accepted(self) -> list[AcceptedEvent]:
        """The events accepted, in order (none while ``record`` is off)."""
        return self._put.recording.events

    @property
    def stats(self) -> Stats:
        return self._put.stats

    def configure(self, **fields: Any) -> None:
        """Change faults at once, as ``POST /_emulator/config``; ValueError names a bad field."""
        self._faults.configure(fields)

    def reset(self) -> None:
        """Forget accepted events and counters (faults stay)."""
        self._put.reset()

    def stats_dict(self) -> dict[str, Any]:
        return self.stats.as_dict()

    async def _put_project_events(self, request: web.Request) -> web.Response:
        body = await _read_body(request)
        response = self._put.answer(request.method, request.raw_path, request.headers, body)
        latency = self._faults.config.latency
        if latency > 0:
            await asyncio.sleep(latency)
        return response

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
