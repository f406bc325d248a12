"""The intake's unauthenticated GET routes: /healthz, /readyz and /metrics (also on its own listener).

Kubernetes probes and Prometheus need them without credentials; they report
the pipeline's state, not only the intake's.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Protocol

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


class Probes:
    """The answers of /healthz, /readyz and (with a registry) /metrics."""

    def __init__(self, health: Health, buffer: Buffer, listeners: Listeners, registry: CollectorRegistry | None,
                 accepting: Callable[[], bool]) -> None:
        self._health = health
        self._buffer = buffer
        self._listeners = listeners
        self._registry = registry
        self._accepting = accepting
        self.routes: dict[str, Handler] = {"/healthz": self._healthz, "/readyz": self._readyz}
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

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        return metrics_response(self._registry)  # type: ignore[arg-type]


async def serve_metrics(registry: CollectorRegistry, config: Config) -> web.AppRunner | None:
    """/metrics alone on its own listener when metrics.port is set; cleanup() the runner to stop it.

    On loopback it answers only a ``Host`` naming this machine, as the intake
    does (a web page's DNS-rebound name must not read the metrics).
    """
    if not config.metrics.port:
        return None
    host = config.metrics.host or config.intake.host
    hosts = HostCheck(host)
    loopback = False

    async def metrics(request: web.Request) -> web.Response:
        if loopback:
            try:
                hosts.check(request.headers.get(hdrs.HOST))
            except Refusal as e:
                return error_response(e.status, e.error_type, e.message)
        return metrics_response(registry)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, config.metrics.port).start()
    loopback = all(is_loopback_address(address[0]) for address in runner.addresses)
    return runner
