"""Wiring and lifecycle: intake -> buffer -> flush loop (batcher) -> sender -> Evidently.

Start-up checks everything that can fail (model, buffer, port) before saying
ready; shutdown is a sequence of phases under one deadline, like uvicorn's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import signal
import time
from typing import Any, Callable

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import config as config_mod
from . import systemd
from .batcher import Batcher, FlushLoop
from .buffer import Buffer, MemoryBuffer
from .client import EvidentlyClient, Transport
from .config import Config
from .deadletter import DeadLetterWriter
from .intake import Intake, metrics_response
from .observability import Metrics, Observer, configure_logging
from .ratelimit import RateLimiter
from .sender import Sender


def make_buffer(config: Config, observer: Observer) -> Buffer:
    if config.buffer.type == "disk":
        from .diskbuffer import DiskBuffer  # sqlite3 only when asked for
        return DiskBuffer(config.buffer, observer)
    return MemoryBuffer(config.buffer, observer)


class Forwarder:
    """One daemon: owns every stage and every background task."""

    def __init__(self, config: Config, config_path: str | None = None, *,
                 transport: Transport | None = None, credentials: tuple[str, str] | None = None,
                 registry: CollectorRegistry | None = None, process_metrics: bool = True,
                 rate_controller: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._config_path = config_path
        self.log = structlog.get_logger("forwarder")
        self.metrics = Metrics(registry, process_collectors=process_metrics)
        self.observer = Observer(self.metrics, self.log)
        self.buffer = make_buffer(config, self.observer)
        self.client: EvidentlyClient | None = None
        if transport is None:
            self.client = EvidentlyClient(config.evidently, credentials)
            transport = self.client
        ev = config.evidently
        self.limiter = RateLimiter(ev.effective_initial_rate, ev.effective_max_rate,
                                   rate_controller or ev.rate_controller, clock,
                                   on_change=self.observer.rate_changed)
        self.sender = Sender(transport, self.buffer, DeadLetterWriter(config.dead_letter.path,
                                                                      config.dead_letter.max_bytes),
                             config.retry, self.limiter, ev.concurrency, self.observer, clock=clock,
                             on_crash=self._crashed)
        self.flush_loop = FlushLoop(self.buffer, Batcher(config.batch, clock), self.sender, self.observer, clock)
        self.intake = Intake(config.intake, ev.default_project, self.buffer, self.observer, self.alive,
                             self.not_ready, self.metrics.registry, upstream_connections=ev.concurrency)
        self._metrics_runner: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._crash: BaseException | None = None
        self._closed = False
        self._wire_gauges()

    def _wire_gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set_function(lambda: self.buffer.depth)
        m.queue_bytes.set_function(lambda: self.buffer.nbytes)
        m.oldest_event_age.set_function(self.oldest_event_age)
        m.inflight.set_function(lambda: self.sender.inflight)
        m.send_rate.set_function(lambda: self.limiter.rate)

    # state

    def oldest_event_age(self) -> float:
        times = [t for t in (self.buffer.oldest_unread(), self.flush_loop.batcher.oldest(), self.sender.oldest())
                 if t is not None]
        return max(0.0, time.time() - min(times)) if times else 0.0

    def alive(self) -> bool:
        return self._crash is None and self.flush_loop.alive and self.sender.alive

    def not_ready(self) -> str | None:
        if self.buffer.full:
            return "buffer full"
        if self.sender.all_circuits_open():
            return "every project's circuit is open"
        return None

    def _crashed(self, exc: BaseException) -> None:
        self.log.error("task_crashed", error=repr(exc), exc_info=exc)
        self._crash = exc
        self._stop.set()

    # lifecycle

    async def start(self) -> None:
        """Open the buffer, create the AWS client, start the stages, then listen."""
        try:
            await self._start()
        except BaseException:
            await self.shutdown()
            raise

    async def _start(self) -> None:
        _check_writable(self.config.dead_letter.path, "dead_letter.path")
        recovered = await self.buffer.open()
        if recovered:
            self.observer.buffer_recovered(recovered, self.config.buffer.path)
        if self.client is not None:
            await self.client.start()
        await self.sender.start()
        self.flush_loop.start(self._crashed)
        port = await self.intake.start()
        if self.config.metrics.port:
            await self._start_metrics_server()
        self.log.info("started", host=self.config.intake.host, port=port, buffer=self.config.buffer.type,
                      region=self.config.evidently.region, endpoint_url=self.config.evidently.endpoint_url or None,
                      send_rate=round(self.limiter.rate, 2), max_rate=self.limiter.max_rate)
        systemd.notify("READY=1\nSTATUS=accepting events")

    async def _start_metrics_server(self) -> None:
        async def metrics(_: web.Request) -> web.Response:
            return metrics_response(self.metrics.registry)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._metrics_runner.setup()
        host = self.config.metrics.host or self.config.intake.host
        await web.TCPSite(self._metrics_runner, host, self.config.metrics.port).start()

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (or a crashed task), then shut down; returns the exit code."""
        await self.start()
        # Start-up leaves ~80k long-lived objects tracked by the cyclic GC
        # (botocore's models and endpoint rules among them): every full collection
        # walked them all, ~40 ms of a stalled loop. Frozen, they are skipped.
        gc.collect()
        gc.freeze()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            while not self._stop.is_set():
                waiters = [asyncio.create_task(self._stop.wait()), asyncio.create_task(self._reload.wait())]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    self.reload()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.shutdown()
        return 1 if self._crash is not None else 0

    async def shutdown(self) -> None:
        """Stop accepting, flush, drain within shutdown.drain_timeout, report, close (idempotent)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.config.shutdown.drain_timeout
        remaining = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731

        # 1. Stop accepting: new events get 503, /readyz says draining.
        self.intake.stop_accepting()
        systemd.notify("STOPPING=1\nSTATUS=draining")
        self.log.info("draining", queue_depth=self.buffer.depth, drain_timeout=self.config.shutdown.drain_timeout)

        # 2. Flush every partial batch into the sender.
        flushed = await self.flush_loop.stop(remaining())

        # 3. Deliver what the sender holds, within the deadline.
        drained = flushed and await self.sender.drain(remaining())

        # 4. Report what could not be delivered in time.
        await self.flush_loop.close()
        await self.sender.close()
        left = self.buffer.depth
        if left and self.config.buffer.type == "memory":
            self.observer.events_dropped("shutdown", left)
        elif left:
            self.log.info("left_on_disk", events=left, path=self.config.buffer.path)

        # 5. Close the AWS client, the listeners and the buffer.
        if self.client is not None:
            await self.client.close()
        await self.intake.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        await self.buffer.close()
        self.log.info("stopped", drained=drained, undelivered=left,
                      sent=int(self.metrics.registry.get_sample_value("forwarder_events_sent_total") or 0))

    def reload(self) -> None:
        """Re-read the configuration file; apply live keys, report the others."""
        self.intake.reload_tls()  # certificate rotation needs no configuration change
        if self._config_path is None:
            self.log.warning("reload_ignored", reason="no configuration file")
            return
        try:
            new = config_mod.load(self._config_path)
        except config_mod.ConfigError as e:
            self.log.error("reload_failed", error=str(e), path=self._config_path)
            return
        changed = config_mod.changed_keys(self.config, new)
        live = [k for k in changed if k in config_mod.RELOADABLE]
        restart = [k for k in changed if k not in config_mod.RELOADABLE]
        self._apply(new)
        self.config = _merge_live(self.config, new)
        self.log.info("reloaded", applied=live, needs_restart=restart)
        if restart:
            self.log.warning("config_needs_restart", keys=restart)

    def _apply(self, new: Config) -> None:
        configure_logging(new.log.level, self.config.log.format)
        self.flush_loop.batcher.reconfigure(new.batch)
        self.sender.retry = new.retry
        self.limiter.reconfigure(new.evidently.effective_initial_rate, new.evidently.effective_max_rate)


def _check_writable(path: str, key: str) -> None:
    """Fail at start, not at the first dead letter, when the file cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise StartupError(f"{key}: cannot create {directory}: {e.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise StartupError(f"{key}: directory {directory} is not writable")


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to fix."""


def _merge_live(old: Config, new: Config) -> Config:
    """The running configuration after a reload: live keys from ``new``, the rest from ``old``."""
    ev = dataclasses.replace(old.evidently, initial_rate=new.evidently.initial_rate,
                             max_rate=new.evidently.max_rate)
    log = dataclasses.replace(old.log, level=new.log.level)
    return dataclasses.replace(old, batch=new.batch, retry=new.retry, evidently=ev, log=log)


async def serve(config: Config, config_path: str | None, **kwargs: Any) -> int:
    """Run one forwarder until it is told to stop; returns the exit code."""
    forwarder = Forwarder(config, config_path, **kwargs)
    return await forwarder.run()
