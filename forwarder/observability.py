"""Metrics and log events.

Each observable event is one method of ``Observer`` that writes one structlog
event with a constant name and updates the matching Prometheus metric (the shape
of Vector's ``internal_events``). Metrics live in a per-daemon registry so that
several forwarders can share a process (tests, the fleet simulation).
"""

from __future__ import annotations

import enum
import logging
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import prometheus_client
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    GCCollector,
)

from prometheus_client.core import CounterMetricFamily

from forwarder import __version__

# The `_created` series double every counter for no use on a dashboard.
prometheus_client.disable_created_metrics()

# Why the intake refused a request's authentication (intake.auth): the label
# values of forwarder_intake_auth_refusals_total, all present from the start.
AUTH_REFUSAL_REASONS = ("missing", "malformed", "presigned", "wrong_scope", "expired", "unknown_key",
                        "body_mismatch", "bad_signature", "wrong_token", "no_certificate", "identity_not_allowed",
                        "bad_certificate")

# Beyond this many distinct projects a `project` label reads "other", so a
# client sending random project names cannot blow up the series count.
MAX_PROJECT_LABELS = 50
MAX_LOGGED_IDS = 50  # eventIds in one log line (a batch holds at most 50 events)
WARNING_INTERVAL = 10.0  # seconds between two lines of the same repeated warning
DATAGRAM_REJECT_REASONS = ("not_json", "truncated", "oversized", "invalid_event", "missing_project",
                           "invalid_project", "wrong_region")
# Whole requests the intake refuses before reading their events (events_rejected reasons).
INTAKE_REJECTIONS = ("malformed_http", "headers_too_large", "header_timeout", "body_timeout", "connection_limit",
                     "unsupported_media_type", "bad_encoding", "forbidden", "unknown_operation", "internal_error")
# Why the intake closed a connection (intake_connections_closed reasons).
CONNECTION_CLOSES = ("evicted", "refused", "header_timeout", "body_timeout", "write_timeout", "headers_too_large",
                     "tls_handshake_failed")
# Why no event can be delivered whatever the events are (forwarder_delivery_blocked reasons):
# no credentials found, credentials refused, a signature refused (wrong secret or region), access denied.
BLOCKED_REASONS = ("no_credentials", "credentials_refused", "signature_refused", "access_denied")
# Seconds between two "delivery_blocked" lines while delivery stays blocked.
BLOCKED_LOG_INTERVAL = 60.0
# Age of events at delivery (seconds), from the intake's receipt to Evidently's answer.
DELIVERY_AGE_BUCKETS = (.05, .1, .25, .5, 1, 2, 5, 10, 30, 60, 300, 600, 1800)

_debug = False  # set by configure_logging: the per-batch debug line costs one global read when off


def cause(code: str, message: str) -> str:
    """An error as one line a person can act on: its class or code, then its message."""
    return f"{code}: {message}"[:500] if message else code


class RetryReason(str, enum.Enum):
    """Why events are sent again: the ``reason`` label of ``forwarder_retries_total``.

    Defined here, with the metrics it labels, so that observability imports no
    stage; the delivery stage decides which reason applies (``delivery.outcome``).
    """

    THROTTLED = "throttled"  # 429, ThrottlingException, throttled entries: the quota is here
    PARTIAL = "partial"  # retryable failed entries of a 200 other than throttling
    SERVER_ERROR = "server_error"  # 5xx
    TIMEOUT = "timeout"  # no answer in time
    CONNECTION = "connection"  # unreachable, or the connection broke
    PROTOCOL = "protocol"  # an answer that does not confirm the batch (e.g. a proxy's HTML page)
    INTERNAL = "internal"  # our own failure while applying an outcome (e.g. the dead-letter file)

    @property
    def outage(self) -> bool:
        """The service is not answering: an outage, not a quota (the rate controller learns nothing)."""
        return self in _OUTAGE


_OUTAGE = frozenset({RetryReason.SERVER_ERROR, RetryReason.TIMEOUT, RetryReason.CONNECTION, RetryReason.PROTOCOL})


class LoopCounter:
    """A counter only the event loop's thread updates: a plain int, read at scrape.

    prometheus_client's Counter takes a lock on every ``inc``, a visible share of
    a single-event intake request, and the intake counts on every request.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.value = 0
        self._name = name
        self._documentation = documentation
        registry.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._documentation, value=self.value)]


class FunctionCounter:
    """A counter whose value is read at scrape time from a function (None: no sample),
    like ``Gauge.set_function`` for totals kept elsewhere, e.g. by the kernel."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._read: Callable[[], float | None] = lambda: None
        registry.register(self)

    def set_function(self, read: Callable[[], float | None]) -> None:
        self._read = read

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> list[CounterMetricFamily]:
        value = self._read()
        return [] if value is None else [CounterMetricFamily(self._name, self._documentation, value=value)]


class Metrics:
    """Every Prometheus metric of one forwarder, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None, process_collectors: bool = True) -> None:
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        Info("forwarder_build", "Build information.", registry=r).info({"version": __version__})
        self.queue_depth = Gauge("forwarder_queue_depth",
                                 "Events accepted and not yet acknowledged by Evidently or dead-lettered.", registry=r)
        self.queue_bytes = Gauge("forwarder_queue_bytes", "Encoded bytes of the events in forwarder_queue_depth.",
                                 registry=r)
        self.oldest_event_age = Gauge("forwarder_oldest_event_age_seconds",
                                      "Age of the oldest event not yet acknowledged or dead-lettered.", registry=r)
        self.events_received = LoopCounter("forwarder_events_received_total", "Events the intake accepted.", r)
        self.events_rejected = Counter("forwarder_events_rejected_total", "Events the intake refused.", ["reason"],
                                       registry=r)
        self.events_sent = Counter("forwarder_events_sent_total", "Events Evidently acknowledged.", registry=r)
        self.events_failed = Counter("forwarder_events_failed_total", "Events written to the dead-letter file.",
                                     ["code"], registry=r)
        self.project_delivered = Counter(
            "forwarder_project_events_delivered_total",
            f"Events Evidently acknowledged, by project (beyond {MAX_PROJECT_LABELS} projects: \"other\").",
            ["project"], registry=r)
        self.project_dead_lettered = Counter(
            "forwarder_project_events_dead_lettered_total",
            f"Events written to the dead-letter file, by project (beyond {MAX_PROJECT_LABELS} projects: \"other\").",
            ["project"], registry=r)
        self.delivery_age = Histogram(
            "forwarder_delivery_age_seconds",
            "Age of each delivered batch's oldest event when Evidently acknowledged it (intake receipt to answer).",
            buckets=DELIVERY_AGE_BUCKETS, registry=r)
        self.delivery_blocked = Gauge(
            "forwarder_delivery_blocked",
            "1 while no event can be delivered because of the forwarder's own AWS identity, by reason: "
            "no_credentials, credentials_refused, signature_refused (wrong secret or region), access_denied.",
            ["reason"], registry=r)
        self.events_dropped = Counter("forwarder_events_dropped_total",
                                      "Accepted events lost on purpose (buffer.when_full=drop_oldest, shutdown).",
                                      ["reason"], registry=r)
        self.duplicates = Counter("forwarder_duplicates_total",
                                  "Copies of events sent again after an attempt that may have delivered them "
                                  "(at-least-once): each extra copy of each event counts.",
                                  registry=r)
        self.batches_sent = Counter("forwarder_batches_sent_total", "Batches handed to the sender.", ["flush_reason"],
                                    registry=r)
        self.batch_size = Histogram("forwarder_batch_size_events", "Events per batch handed to the sender.",
                                    buckets=(1, 2, 5, 10, 20, 30, 40, 49, 50), registry=r)
        self.throttled = Counter("forwarder_throttled_total",
                                 "Throttling answers from Evidently: whole-request 429s and throttled entries.",
                                 registry=r)
        self.retries = Counter("forwarder_retries_total", "Events scheduled for another attempt.", ["reason"],
                               registry=r)
        self.request_duration = Histogram("forwarder_request_duration_seconds", "PutProjectEvents call duration.",
                                          ["outcome"],
                                          buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.inflight = Gauge("forwarder_inflight_requests", "PutProjectEvents calls in flight.", registry=r)
        self.send_rate = Gauge("forwarder_send_rate", "Allowed PutProjectEvents requests per second.", registry=r)
        self.circuit_open = Gauge("forwarder_circuit_open", "1 while a project's circuit breaker is open.",
                                  ["project"], registry=r)
        self.outage = Gauge("forwarder_outage", "1 while Evidently is not answering (only probes are sent).",
                            registry=r)
        self.outage_seconds = Counter("forwarder_outage_seconds_total",
                                      "Time spent in outages that ended (see forwarder_outage for the current one).",
                                      registry=r)
        self.outage_probes = Counter("forwarder_outage_probes_total",
                                     "Calls sent as probes while Evidently was not answering.", registry=r)
        self.dead_letter_errors = Counter("forwarder_dead_letter_write_errors_total",
                                          "Events whose dead-letter write failed (kept and written again later).",
                                          registry=r)
        self.internal_errors = Counter("forwarder_internal_errors_total",
                                       "Bugs caught at run time: batches whose attempt failed, repeated acks.",
                                       ["kind"], registry=r)
        self.buffer_corruptions = Counter("forwarder_buffer_corruptions_total",
                                          "Damaged buffer databases moved aside at start.", registry=r)
        self.buffer_write_errors = Counter("forwarder_buffer_write_errors_total",
                                           "Disk buffer transactions that failed (their requests got an error).",
                                           registry=r)
        self.datagrams_received = LoopCounter(
            "forwarder_datagrams_received_total",
            "Datagrams read from the datagram intake's sockets (Unix and UDP).", r)
        self.datagram_rejected = Counter(
            "forwarder_datagram_rejected_total",
            "Datagram intake: events refused, by reason; a datagram that is not JSON, truncated or oversized "
            "counts once.", ["reason"], registry=r)
        self.datagram_paused = Gauge(
            "forwarder_datagram_paused",
            "1 while the datagram intake does not read (buffer full, appends behind, draining): Unix senders "
            "block or get EAGAIN, UDP datagrams beyond the socket buffer are dropped.", registry=r)
        self.datagram_kernel_drops = FunctionCounter(
            "forwarder_datagram_kernel_drops_total",
            "UDP datagrams the kernel dropped because the intake's socket buffer was full (/proc/net/udp).", r)
        self.intake_connections = Gauge("forwarder_intake_connections",
                                        "Open intake connections, every listener (TCP, TLS, Unix socket).", registry=r)
        self.intake_connection_limit = Gauge("forwarder_intake_connection_limit",
                                             "intake.max_connections as applied (lowered to fit RLIMIT_NOFILE).",
                                             registry=r)
        self.intake_connections_closed = Counter(
            "forwarder_intake_connections_closed_total",
            "Intake connections the forwarder closed: evicted or refused at the connection limit, timed out, "
            "or over intake.max_header_bytes.", ["reason"], registry=r)
        self.auth_refusals = Counter("forwarder_intake_auth_refusals_total",
                                     "Requests the intake refused for their authentication (intake.auth), by reason.",
                                     ["reason"], registry=r)
        self.auth_credentials = Gauge("forwarder_intake_auth_credentials",
                                      "Access keys (intake.auth = sigv4) or tokens (token) the intake accepts.",
                                      registry=r)
        self.auth_reload_errors = Counter("forwarder_intake_auth_reload_errors_total",
                                          "SIGHUPs whose credentials or token file could not be read (the previous "
                                          "set stays in force).", registry=r)
        for reason in AUTH_REFUSAL_REASONS:
            self.auth_refusals.labels(reason)
        self._projects: set[str] = set()
        # Known label values exist from the start at 0, so increase() sees the first burst.
        for reason in ("validation", "wrong_region", "body_too_large", "buffer_full", "buffer_error", "draining"):
            self.events_rejected.labels(reason)
        for reason in INTAKE_REJECTIONS:
            self.events_rejected.labels(reason)
        for reason in CONNECTION_CLOSES:
            self.intake_connections_closed.labels(reason)
        for reason in ("buffer_full", "shutdown"):
            self.events_dropped.labels(reason)
        for reason in DATAGRAM_REJECT_REASONS:
            self.datagram_rejected.labels(reason)
        for reason in ("size", "deadline", "drain"):
            self.batches_sent.labels(reason)
        for retry_reason in RetryReason:
            self.retries.labels(retry_reason.value)
        for kind in ("send_failed", "ack_repeated"):
            self.internal_errors.labels(kind)
        for reason in BLOCKED_REASONS:
            self.delivery_blocked.labels(reason)
        self._delivered: dict[str, Any] = {}  # project label -> its delivered counter (labels() costs a lock)

    def known_project(self, project: str) -> None:
        """A project known at start (evidently.default_project): its series exist at 0 from the start."""
        label = self.project_label(project)
        self.project_delivered.labels(label)
        self.project_dead_lettered.labels(label)
        self.circuit_open.labels(label)

    def delivered_counter(self, label: str) -> Any:
        counter = self._delivered.get(label)
        if counter is None:
            counter = self._delivered[label] = self.project_delivered.labels(label)
        return counter

    def project_label(self, project: str) -> str:
        if project in self._projects:
            return project
        if len(self._projects) < MAX_PROJECT_LABELS:
            self._projects.add(project)
            return project
        return "other"


class RateLimitedLog:
    """Repeated warnings at most once per interval, each saying how many were suppressed."""

    def __init__(self, log: Any, interval: float = WARNING_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self._log = log
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, level: str, event: str, **fields: Any) -> None:
        now = self._clock()
        last = self._last.get(event)
        if last is not None and now - last < self._interval:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return
        self._last[event] = now
        suppressed = self._suppressed.pop(event, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        getattr(self._log, level)(event, **fields)


@dataclass(slots=True)
class ProjectTally:
    """What happened to one project's events (by its label, so bounded like the metrics)."""

    delivered: int = 0
    dead_lettered: int = 0
    last_delivery: float | None = None  # wall clock of the last acknowledgement
    last_dead_letter: str = ""  # the cause of the last dead letter


class Observer:
    """One method per observable event: a structlog line (if any) and its metrics."""

    def __init__(self, metrics: Metrics, log: Any | None = None) -> None:
        self.metrics = metrics
        self.log = log or structlog.get_logger("forwarder")
        self.limited = RateLimitedLog(self.log)
        self.blocked_log = RateLimitedLog(self.log, BLOCKED_LOG_INTERVAL)
        self.projects: dict[str, ProjectTally] = {}  # by project label: what /status shows per project
        self._connections_closed: dict[str, Any] = {}

    # intake
    def events_received(self, n: int) -> None:
        self.metrics.events_received.inc(n)

    def events_rejected(self, reason: str, n: int) -> None:
        self.metrics.events_rejected.labels(reason).inc(n)
        if reason in ("buffer_full", "draining"):
            self.limited("warning", "intake_rejected", reason=reason, events=n)

    # datagram intake
    def datagrams_received(self, n: int) -> None:
        self.metrics.datagrams_received.inc(n)

    def datagram_rejected(self, reason: str, n: int, message: str) -> None:
        self.metrics.datagram_rejected.labels(reason).inc(n)
        self.limited("warning", "datagram_rejected", reason=reason, events=n, message=message[:300])

    def datagram_paused(self, reason: str, waiting: int) -> None:
        """The datagram intake stopped reading: its senders see the backpressure."""
        self.limited("warning", "datagram_intake_paused", reason=reason, events_waiting=waiting)

    def datagram_append_failed(self, n: int, error: BaseException) -> None:
        """The buffer refused a datagram batch with an error (not full): kept, tried again."""
        self.limited("error", "datagram_append_failed", events=n, error=repr(error))
    def connection_closed(self, reason: str, connections: int, limit: int) -> None:
        # labels() costs more than the rest of an eviction: a flood evicts thousands a second.
        counter = self._connections_closed.get(reason)
        if counter is None:
            counter = self._connections_closed[reason] = self.metrics.intake_connections_closed.labels(reason)
        counter.inc()
        event = "connection_limit_reached" if reason in ("evicted", "refused") else "connection_closed"
        self.limited("warning", event, reason=reason, connections=connections, limit=limit)

    def accept_failed(self, error: OSError, connections: int, limit: int) -> None:
        self.limited("error", "accept_failed", error=str(error), connections=connections, limit=limit)

    def tls_handshake_failed(self, error: BaseException) -> None:
        self.metrics.intake_connections_closed.labels("tls_handshake_failed").inc()
        if isinstance(error, ssl.SSLCertVerificationError):  # intake.auth = "mtls": a client certificate refused
            self.metrics.auth_refusals.labels("bad_certificate").inc()
            self.limited("warning", "auth_refused", reason="bad_certificate", auth="mtls",
                         error=(error.verify_message or str(error))[:200])
            return
        self.limited("info", "tls_handshake_failed", error=str(error)[:200])

    def auth_refused(self, reason: str, scheme: str, key: str, remote: str | None) -> None:
        """A request refused for its credentials: nothing of it was read into the buffer."""
        self.metrics.auth_refusals.labels(reason).inc()
        self.metrics.events_rejected.labels("unauthenticated").inc()
        self.limited("warning", "auth_refused", reason=reason, auth=scheme, key=key or None, remote=remote)

    def auth_loaded(self, path: str, count: int, reload: bool) -> None:
        self.metrics.auth_credentials.set(count)
        self.log.info("auth_reloaded" if reload else "auth_loaded", path=path, credentials=count)

    def auth_reload_failed(self, path: str, error: str) -> None:
        self.metrics.auth_reload_errors.inc()
        self.log.error("reload_failed", path=path, error=error, kept="the previous credentials")

    # buffer
    def events_dropped(self, reason: str, n: int) -> None:
        self.metrics.events_dropped.labels(reason).inc(n)
        self.limited("warning" if reason == "buffer_full" else "error", "events_dropped", reason=reason, events=n)

    def buffer_corrupted(self, path: str, moved_to: str, error: str) -> None:
        self.metrics.buffer_corruptions.inc()
        self.log.error("buffer_corrupted", path=path, moved_to=moved_to, error=error)

    def buffer_write_failed(self, path: str, error: str, appends: int, acks: int) -> None:
        self.metrics.buffer_write_errors.inc()
        self.limited("error", "buffer_write_failed", path=path, error=error, appends=appends, acks=acks)

    def buffer_recovered(self, events: int, path: str) -> None:
        if events:
            self.log.info("buffer_recovered", events=events, path=path)

    # batcher
    def batch_flushed(self, reason: str, size: int) -> None:
        self.metrics.batches_sent.labels(reason).inc()
        self.metrics.batch_size.observe(size)

    # sender
    def request_done(self, outcome: str, seconds: float) -> None:
        self.metrics.request_duration.labels(outcome).observe(seconds)

    def batch_delivered(self, project: str, n: int, age: float, ids: Callable[[], tuple[str, str]] | None = None) -> None:
        """Evidently acknowledged ``n`` events of a batch whose oldest event is ``age`` seconds old."""
        m = self.metrics
        label = m.project_label(project)
        m.events_sent.inc(n)
        m.delivered_counter(label).inc(n)
        m.delivery_age.observe(age)
        tally = self.projects.get(label)
        if tally is None:
            tally = self.projects[label] = ProjectTally()
        tally.delivered += n
        tally.last_delivery = time.time()
        if _debug:  # one global read per batch when debug is off
            first, last = ids() if ids is not None else (None, None)
            self.log.debug("batch_delivered", project=project, events=n, first_event_id=first,
                           last_event_id=last, age=round(age, 3))

    def events_sent(self, n: int) -> None:
        self.metrics.events_sent.inc(n)

    def throttled(self, n: int, project: str) -> None:
        self.metrics.throttled.inc(n)
        self.limited("warning", "throttled", project=project, events=n)

    def retry_scheduled(self, reason: RetryReason, n: int, project: str, delay: float, code: str,
                        message: str = "") -> None:
        self.metrics.retries.labels(reason.value).inc(n)
        if reason is not RetryReason.THROTTLED:
            self.limited("warning", "retry_scheduled", reason=reason.value, project=project, events=n,
                         delay=round(delay, 3), code=code, error=cause(code, message))

    def send_failed(self, project: str, n: int, error: BaseException) -> None:
        """An attempt failed inside the forwarder (a bug): the batch is tried again later."""
        self.metrics.internal_errors.labels("send_failed").inc()
        self.limited("error", "send_failed", project=project, events=n, error=repr(error), exc_info=error)

    def ack_repeated(self, n: int) -> None:
        """Events acknowledged to the buffer a second time (a bug): ignored, never subtracted twice."""
        self.metrics.internal_errors.labels("ack_repeated").inc(n)
        self.limited("error", "ack_repeated", events=n)

    def dead_letter_failed(self, n: int, error: BaseException) -> None:
        self.metrics.dead_letter_errors.inc(n)
        self.limited("error", "dead_letter_write_failed", events=n, error=cause(type(error).__name__, str(error)))

    def outage_started(self, failures: int, waiting: int, last_error: str = "") -> None:
        self.metrics.outage.set(1)
        self.log.warning("outage_started", consecutive_failures=failures, events_waiting=waiting,
                         last_error=last_error)

    def outage_ended(self, seconds: float, probes: int, waiting: int, resumed_batches: int,
                     last_error: str = "") -> None:
        self.metrics.outage.set(0)
        self.metrics.outage_seconds.inc(seconds)
        self.log.info("outage_ended", seconds=round(seconds, 3), probes=probes, events_waiting=waiting,
                      resumed_batches=resumed_batches, last_error=last_error)

    def probe_sent(self) -> None:
        self.metrics.outage_probes.inc()

    def possible_duplicates(self, n: int) -> None:
        self.metrics.duplicates.inc(n)

    def dead_lettered(self, code: str, n: int, project: str, message: str, event_ids: list[str] | None = None,
                      reason: str = "refused by Evidently", grace: float | None = None) -> None:
        """Events written to the dead-letter file; ``reason``: what ended them (``grace``: a missing project's)."""
        label = self.metrics.project_label(project)
        self.metrics.events_failed.labels(code).inc(n)
        self.metrics.project_dead_lettered.labels(label).inc(n)
        tally = self.projects.get(label)
        if tally is None:
            tally = self.projects[label] = ProjectTally()
        tally.dead_lettered += n
        tally.last_dead_letter = cause(code, message)
        self.limited("error", "dead_lettered", code=code, project=project, events=n, error=cause(code, message),
                     reason=reason, grace=grace, event_ids=None if event_ids is None else event_ids[:MAX_LOGGED_IDS])

    def circuit_changed(self, project: str, is_open: bool, reason: str = "", retry_in: float = 0.0,
                        message: str = "") -> None:
        self.metrics.circuit_open.labels(self.metrics.project_label(project)).set(1 if is_open else 0)
        if is_open:
            self.limited("warning", "circuit_opened", project=project, reason=reason, retry_in=round(retry_in, 3),
                         error=cause(reason, message))
        else:
            self.log.info("circuit_closed", project=project)

    def delivery_blocked(self, reason: str, code: str, message: str) -> None:
        """Every call is refused for the forwarder's own identity: the events are held, not dead-lettered."""
        for label in BLOCKED_REASONS:
            self.metrics.delivery_blocked.labels(label).set(1 if label == reason else 0)
        self.blocked_log("error", "delivery_blocked", reason=reason, code=code,
                         error=f"delivery blocked: {cause(code, message)}")

    def delivery_unblocked(self) -> None:
        for label in BLOCKED_REASONS:
            self.metrics.delivery_blocked.labels(label).set(0)
        self.log.info("delivery_unblocked")

    def credentials_missing(self, how: str) -> None:
        self.metrics.delivery_blocked.labels("no_credentials").set(1)
        self.blocked_log("error", "credentials_missing",
                         error="no AWS credentials found: nothing can be delivered; events are held", fix=how)

    def credentials_found(self, method: str) -> None:
        self.metrics.delivery_blocked.labels("no_credentials").set(0)
        self.log.info("credentials_found", method=method)

    def rate_changed(self, rate: float, reason: str) -> None:
        if reason == "throttled":
            self.limited("info", "send_rate_decreased", rate=round(rate, 2))


def configure_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Route structlog to one line per event on stdout (JSON by default)."""
    global _debug
    _debug = level == "debug"
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
