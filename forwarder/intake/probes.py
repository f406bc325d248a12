"""The intake's unauthenticated GET routes: /healthz, /readyz, /status and /metrics (the last two
also on the metrics listener).

Kubernetes probes, Prometheus and a person running ``forwarder status`` need
them without credentials; they report the pipeline's state, not only the
intake's. /status is the document of ``forwarder/status.py``.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry

from forwarder.buffer.contract import Buffer
from forwarder.config import Config, is_loopback_address
from forwarder.evidently.protocol import error_response
from forwarder.intake.answers import json_response, metrics_response
from forwarder.intake.checks import HostCheck, Refusal
from forwarder.intake.listeners import Listeners

Handler = Callable[[web.BaseRequest], Awaitable[web.Response]]


class Health(Protocol):
    """What /healthz and /readyz report: the pipeline's, not only the intake's."""

    def alive(self) -> bool: ...

    def not_ready(self) -> str | None:
        """Why new events should go elsewhere now, or None."""

    def status(self) -> dict[str, Any]:
        """The status document (forwarder/status.py)."""


class Probes:
    """The answers of /healthz, /readyz and (with a registry) /metrics."""

    def __init__(self, health: Health, buffer: Buffer, listeners: Listeners, registry: CollectorRegistry | None,
                 accepting: Callable[[], bool]) -> None:
        self._health = health
        self._buffer = buffer
        self._listeners = listeners
        self._registry = registry
        self._accepting = accepting
        self.routes: dict[str, Handler] = {"/healthz": self._healthz, "/readyz": self._readyz,
                                           "/status": self._status}
        if registry is not None:
            self.routes["/metrics"] = self._metrics

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        if not self._health.alive():
            return json_response({"status": "a pipeline task has stopped"}, 503)
        connections = self._listeners.connections
        if connections is not None and not connections.alive:
            return json_response({"status": "the intake's connection sweep has stopped"}, 503)
        return json_response({"status": "ok"})

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        if not self._accepting():
            # What is left to deliver, readable until the listener closes (a scrape may come too late).
            return json_response({"status": "not ready", "reason": "draining", "queue_depth": self._buffer.depth},
                                 503)
        reason = self._health.not_ready()
        if reason is None:
            return json_response({"status": "ready"})
        return json_response({"status": "not ready", "reason": reason}, 503)

    async def _status(self, request: web.BaseRequest) -> web.Response:
        return json_response(self._health.status())

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        return metrics_response(self._registry)  # type: ignore[arg-type]


async def serve_metrics(registry: CollectorRegistry, config: Config,
                        status: Callable[[], dict[str, Any]]) -> web.AppRunner | None:
    """/metrics and /status on their own listener when metrics.port is set; cleanup() the runner to stop it.

    On loopback it answers only a ``Host`` naming this machine, as the intake
    does (a web page's DNS-rebound name must not read the metrics or the status).
    """
    if not config.metrics.port:
        return None
    host = config.metrics.host or config.intake.host
    hosts = HostCheck(host)
    loopback = False

    def refused(request: web.Request) -> web.Response | None:
        if loopback:
            try:
                hosts.check(request.headers.get(hdrs.HOST))
            except Refusal as e:
                return error_response(e.status, e.error_type, e.message)
        return None

    async def metrics(request: web.Request) -> web.Response:
        return refused(request) or metrics_response(registry)

    async def status_document(request: web.Request) -> web.Response:
        return refused(request) or json_response(status())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status_document)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, config.metrics.port).start()
    loopback = all(is_loopback_address(address[0]) for address in runner.addresses)
    return runner
