"""Wiring and lifecycle: intake -> buffer -> flush loop (batcher) -> sender -> Evidently.

Start-up checks what it can before saying ready: the Evidently model, the
buffer, the dead-letter directory, the listeners and the intake's credential
files. It does not check AWS credentials (the chain may only resolve them at
the first call, and an emulator needs dummy ones). Shutdown is a sequence of
phases under one deadline, like uvicorn's.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any, Callable, Mapping

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from forwarder import config as config_mod
from forwarder import status as status_mod
from forwarder import systemd
from forwarder.intake.auth import CredentialsError, make_authenticator
from forwarder.delivery.batcher import Batcher, FlushLoop
from forwarder.buffer.contract import Buffer
from forwarder.buffer.memory import MemoryBuffer
from forwarder.delivery.client import ClientCertError, EvidentlyClient, Transport
from forwarder.delivery.credentials import CredentialsWatch
from forwarder.clock import Clock
from forwarder.config import Config, LogConfig
from forwarder.intake.datagram.stage import DatagramIntake
from forwarder.delivery.deadletter import DeadLetterWriter
from forwarder.intake.http import Intake
from forwarder.lifecycle import Deadline, Signals
from forwarder.observability import Metrics, Observer, configure_logging
from forwarder.intake.probes import serve_metrics
from forwarder.delivery.rate import SHIPPED_CONTROLLERS, ControllerFactory, RateLimiter
from forwarder.delivery.sender import Sender
from forwarder.reload import Live, Reload
from forwarder.watch import FileWatch


def make_buffer(config: Config, observer: Observer) -> Buffer:
    if config.buffer.type == "disk":
        from forwarder.buffer.disk.buffer import DiskBuffer  # sqlite3 only when asked for
        return DiskBuffer(config.buffer, observer)
    return MemoryBuffer(config.buffer, observer)


class Forwarder:
    """One daemon: owns every stage and every background task."""

    def __init__(self, config: Config, config_path: str | None = None, *,
                 transport: Transport | None = None, credentials: tuple[str, str] | None = None,
                 registry: CollectorRegistry | None = None, process_metrics: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 controllers: Mapping[str, ControllerFactory] = SHIPPED_CONTROLLERS) -> None:
        self.log = structlog.get_logger("forwarder")
        # A reload validates against the same rate controllers as the start did.
        self._reload = Reload(config, config_path, self.live_stages, self.log,
                              load=lambda p: config_mod.load(p, regular_only=True, controllers=controllers))
        self.metrics = Metrics(registry, process_collectors=process_metrics)
        self.observer = Observer(self.metrics, self.log)
        self.buffer = make_buffer(config, self.observer)
        self.client = EvidentlyClient(config.evidently, credentials) if transport is None else None
        transport = transport or self.client
        ev = config.evidently
        if ev.rate_controller not in controllers:  # a configuration validated against other controllers
            raise StartupError(f"evidently.rate_controller must be one of {', '.join(controllers)}, "
                               f"got {ev.rate_controller!r}")
        self.limiter = RateLimiter(ev.effective_initial_rate, ev.effective_max_rate,
                                   controllers[ev.rate_controller], clock,
                                   on_change=self.observer.rate_changed)
        self.sender = Sender(transport, self.buffer,
                             DeadLetterWriter(config.dead_letter.path, config.dead_letter.max_bytes),
                             self.limiter, self.observer, config.retry, ev.concurrency, Clock(monotonic=clock))
        self.flush_loop = FlushLoop(self.buffer, Batcher(config.batch, clock), self.sender, self.observer, clock)
        self.intake = Intake(config.intake, ev.default_project, self.buffer, self.observer, self,
                             self.metrics.registry, upstream_connections=ev.concurrency, region=ev.region)
        try:
            self.auth = self.intake.authenticate = make_authenticator(config.intake, ev.region, self.observer)
        except CredentialsError as e:
            raise StartupError(str(e)) from None
        self.datagram = DatagramIntake(config.intake, ev.default_project, self.buffer, self.observer,
                                       region=ev.region)
        # Renewed certificates and rotated credentials are picked up with no signal (forwarder/watch.py);
        # made at start, once the TLS listener (a stage with files) exists.
        self.files: FileWatch | None = None
        self.logging = Logging()
        self._metrics_server: web.AppRunner | None = None
        self._signals = Signals(self.log)
        self._crash: BaseException | None = None
        self._closed = False
        self.started_at = time.time()
        self.credentials: CredentialsWatch | None = None
        self._credentials_task: asyncio.Task[None] | None = None
        if ev.default_project:  # its series exist at 0 from the start
            self.metrics.known_project(ev.default_project)
        watch_pipeline(self.metrics, self.buffer, self.flush_loop.batcher, self.sender, self.limiter)
        self._reload.table()  # a stage declaring a key that does not exist fails here, not at the first SIGHUP

    @property
    def config(self) -> Config:
        """The configuration in force: the one started with, live keys as the last reload left them."""
        return self._reload.config

    # state

    def alive(self) -> bool:
        return self._crash is None and self.flush_loop.alive and self.sender.alive

    def not_ready(self) -> str | None:
        if self.buffer.full:
            return "buffer full"
        return self.buffer.problem or self.sender.stalled()

    def status(self) -> dict[str, Any]:
        """The status document of /status and `forwarder status`."""
        return status_mod.document(self)

    def _crashed(self, exc: BaseException) -> None:
        self.log.error("task_crashed", error=repr(exc), exc_info=exc)
        self._crash = exc
        self._signals.stop.set()

    # lifecycle

    async def start(self) -> None:
        """Open the buffer, create the AWS client, start the stages, then listen."""
        try:
            await self._start()
        except BaseException:
            await self.shutdown(started=False)
            raise

    async def _start(self) -> None:
        _check_writable(self.config.dead_letter.path, "dead_letter.path")
        self.observer.buffer_recovered(await self.buffer.open(self._crashed), self.config.buffer.path)
        if self.client is not None:
            try:
                await self.client.start()
            except ClientCertError as e:
                raise StartupError(str(e)) from None
            await self._check_credentials(self.client)
        await self.sender.start(self._crashed)
        self.flush_loop.start(self._crashed)
        port = await self.intake.start()
        await self.datagram.start(self._crashed)
        self.files = FileWatch(self.reloaded_files(), self._files_changed)
        self.files.start(self._crashed)
        self._metrics_server = await serve_metrics(self.metrics.registry, self.config, self.status)
        ev = self.config.evidently
        self.log.info("started", host=self.config.intake.host, port=port if self.config.intake.port != -1 else None,
                      unix_socket=self.config.intake.unix_socket or None, buffer=self.config.buffer.type,
                      region=ev.region, region_source=ev.region_source,
                      endpoint=self.client.endpoint if self.client is not None else ev.endpoint_url or None,
                      credentials=self.credentials.method if self.credentials is not None else None,
                      send_rate=round(self.limiter.rate, 2), max_rate=self.limiter.max_rate)
        systemd.notify("READY=1\nSTATUS=accepting events")

    async def _check_credentials(self, client: EvidentlyClient) -> None:
        """Say at once when no credentials are found, and keep looking until some are."""
        async def found(method: str) -> None:
            await client.use_new_credentials()
            self.observer.credentials_found(method)

        self.credentials = CredentialsWatch(client.credentials_method, self.observer.credentials_missing, found)
        if not await self.credentials.check():
            task = self._credentials_task = asyncio.create_task(self.credentials.watch(), name="forwarder-credentials")
            task.add_done_callback(lambda t: None if t.cancelled() or t.exception() is None
                                   else self._crashed(t.exception()))  # type: ignore[arg-type]

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (or a crashed task), then shut down; returns the exit code."""
        self._signals.install()
        try:
            await self.start()
            # Start-up leaves tens of thousands of long-lived objects tracked by the
            # cyclic GC (botocore's models and endpoint rules among them): every full
            # collection walked them all and stalled the loop. Frozen, they are skipped.
            gc.collect()
            gc.freeze()
            while await self._signals.next() == "reload":
                await self._signals.unless_stopped(self.reload())  # a stop does not wait for a reload
            await self.shutdown()
        finally:
            self._signals.uninstall()
        return 1 if self._crash is not None else 0

    async def shutdown(self, started: bool = True) -> None:
        """Stop accepting, flush, drain within shutdown.drain_timeout, report, close (idempotent).

        ``started=False``: a start-up that failed; the same phases, without the draining and
        stopped lines of a daemon that never said it started.
        """
        if self._closed:
            return
        self._closed = True
        self._signals.stop.set()  # a stop signal from now on hurries the drain
        deadline = Deadline(self.config.shutdown.drain_timeout, self._signals.hurry)

        # 1. Stop accepting: new events get 503, /readyz says draining.
        self.intake.stop_accepting()
        if self.files is not None:
            await self.files.close()
        await deadline.within(self.datagram.stop(), None)  # what the sockets took goes into the buffer
        if started:
            systemd.notify("STOPPING=1\nSTATUS=draining")
            self.log.info("draining", queue_depth=self.buffer.depth,
                          drain_timeout=self.config.shutdown.drain_timeout)

        # 2. Flush every partial batch into the sender.
        flushed = await deadline.within(self.flush_loop.stop(deadline.remaining()), False)

        # 3. Deliver what the sender holds, within the deadline.
        drained = flushed and await deadline.within(self.sender.drain(deadline.remaining()), False)

        # 4. Report what could not be delivered in time.
        await self.flush_loop.close()
        await self.sender.close()
        left, dropped = _report_undelivered(self.buffer.depth, self.config, self.observer)

        # 5. Close the AWS client, the listeners and the buffer.
        if self._credentials_task is not None:
            self._credentials_task.cancel()
            await asyncio.gather(self._credentials_task, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        await self.intake.close()
        await self.datagram.close()
        if self._metrics_server is not None:
            await self._metrics_server.cleanup()
        await self.buffer.close()
        if not started:
            return
        self.log.info("stopped", drained=drained, undelivered=left, dropped=dropped,
                      sent=int(self.metrics.registry.get_sample_value("forwarder_events_sent_total") or 0))

    async def reload(self) -> None:
        """Re-read the configuration file and the stages' files (SIGHUP); apply live keys, report the others."""
        await self._reload.reload()

    async def reload_files(self) -> None:
        """Re-read the certificate, key, token and credentials files only, with the configuration in force."""
        await self._reload.reload_files()

    async def _files_changed(self, paths: list[str]) -> None:
        self.log.info("files_changed", paths=paths)
        await self.reload_files()

    def live_stages(self) -> list[Live]:
        """The stages a reload walks, each declaring its keys (LIVE_KEYS) and the files it re-reads (FILE_KEYS)."""
        stages: list[Live] = [self.logging, self.flush_loop, self.sender, self.limiter]
        if self.intake.tls is not None:
            stages.append(self.intake.tls)
        if self.auth is not None:
            stages.append(self.auth)
        if self.client is not None and self.config.evidently.client_cert_file:
            stages.append(self.client)
        return stages

    def reloaded_files(self) -> list[str]:
        """The files reload_files() re-reads (certificates, tokens, credentials): what a watcher watches."""
        return self._reload.files()

    def live_keys(self) -> dict[str, str]:
        """Each key a reload applies -> the stage that applies it; every other key needs a restart."""
        return self._reload.table()


class Logging:
    """The log stage: the level applies on reload; the format is the stream's shape, fixed at start."""

    LIVE_KEYS = ("log.level",)

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream  # None: standard output

    async def reconfigure(self, log: LogConfig) -> None:
        configure_logging(log.level, log.format, self._stream)


def watch_pipeline(metrics: Metrics, buffer: Buffer, batcher: Batcher, sender: Sender, limiter: RateLimiter) -> None:
    """The gauges that read the stages' state at scrape time."""
    def oldest_event_age() -> float:
        times = [t for t in (buffer.oldest_unread(), batcher.oldest(), sender.oldest()) if t is not None]
        return max(0.0, time.time() - min(times)) if times else 0.0

    metrics.queue_depth.set_function(lambda: buffer.depth)
    metrics.queue_bytes.set_function(lambda: buffer.nbytes)
    metrics.oldest_event_age.set_function(oldest_event_age)
    metrics.inflight.set_function(lambda: sender.inflight)
    metrics.send_rate.set_function(lambda: limiter.rate)


def _report_undelivered(left: int, config: Config, observer: Observer) -> tuple[int, int]:
    """(left, dropped) after the drain: a memory buffer drops what is left, a disk buffer keeps it."""
    dropped = left if config.buffer.type == "memory" else 0
    if dropped:
        observer.events_dropped("shutdown", dropped)
    elif left:
        observer.log.info("left_on_disk", events=left, path=config.buffer.path)
    return left, dropped


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


async def serve(config: Config, config_path: str | None, **kwargs: Any) -> int:
    """Run one forwarder until it is told to stop; returns the exit code."""
    forwarder = Forwarder(config, config_path, **kwargs)
    return await forwarder.run()
