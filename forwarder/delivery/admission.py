"""Whether and when a batch may be sent: its project's circuit, the endpoint's health, the rate.

The sender asks before each call (``hold``, then ``turn``) and tells afterwards
what the answer taught (``learn``). Throttling teaches the rate limiter; an
answer or its absence teaches the endpoint's outage breaker and the project's
circuit. Nothing here sends, reschedules or acknowledges.
"""

from __future__ import annotations

from typing import Callable

from forwarder.delivery.circuits import Endpoint, ProjectCircuits
from forwarder.clock import Clock
from forwarder.config import RetryConfig
from forwarder.observability import Observer
from forwarder.delivery.outcome import Hold, Plan, RateSignal
from forwarder.delivery.rate import RateLimiter

OUTAGE_AFTER = 3  # consecutive calls without an answer that make an outage
# Longest wait between two probes of an endpoint in outage: it bounds how late
# the end of an outage is noticed, and one call per second is nothing to a service.
MAX_PROBE_INTERVAL = 1.0


class Admission:
    """The layers a call passes before it goes out, and what its answer teaches them."""

    def __init__(self, limiter: RateLimiter, observer: Observer, retry: RetryConfig, clock: Clock,
                 waiting: Callable[[], int], on_recovery: Callable[[], int]) -> None:
        self.limiter = limiter
        self._observer = observer
        self.retry = retry
        self.circuits = ProjectCircuits(clock.monotonic, observer.circuit_changed)
        self.endpoint = Endpoint(OUTAGE_AFTER, retry.initial_backoff, MAX_PROBE_INTERVAL, clock.monotonic)
        self._waiting = waiting  # events waiting, for the outage log lines
        self._on_recovery = on_recovery  # makes the retries an outage pushed back due; returns how many

    def hold(self, project: str, batch_id: int) -> tuple[float, str, str] | None:
        """None when the batch's project may be called; else (due, code, message) of its open circuit."""
        return self.circuits.hold(project, batch_id)

    def refused(self, project: str, batch_id: int, code: str, message: str) -> float:
        """The service refused the project: open its circuit; returns when to try again."""
        return self.circuits.refused(project, batch_id, code, message, self.retry.initial_backoff,
                                     self.retry.max_backoff)

    def released(self, project: str, batch_id: int) -> None:
        self.circuits.released(project, batch_id)

    async def turn(self) -> tuple[bool, float]:
        """Wait until a call may go: (is it the endpoint's probe, its time for the rate limiter)."""
        while True:
            probe = await self.endpoint.admit()
            try:
                sent_at = await self.limiter.acquire()
            except BaseException:
                if probe:
                    self.endpoint.release()
                raise
            # An outage that began while this call waited for its turn holds it back too.
            if probe or not self.endpoint.down:
                if probe:
                    self._observer.probe_sent()
                return probe, sent_at

    def release(self) -> None:
        """A probe's turn that made no call after all."""
        self.endpoint.release()

    def learn(self, project: str, outcome: Plan, sent_at: float, probe: bool) -> None:
        if outcome.answered:
            outage = self.endpoint.answered()
            if outage is not None:
                resumed = self._on_recovery()
                self._observer.outage_ended(outage, self.endpoint.probes, self._waiting(), resumed)
            if not any(isinstance(e, Hold) for e in outcome.effects):
                self.circuits.answered(project)
        else:
            if self.endpoint.failed(probe):
                self._observer.outage_started(OUTAGE_AFTER, self._waiting())
            self.circuits.unanswered(project)
        if outcome.throttled:
            self._observer.throttled(outcome.throttled, project)
        if outcome.rate is RateSignal.SUCCESS:
            self.limiter.on_success()
        elif outcome.rate is RateSignal.THROTTLE:
            self.limiter.on_throttle(sent_at)

    def blocked(self) -> str | None:
        """What keeps calls from going out, if anything: an outage or open circuits."""
        if self.endpoint.down:
            return "Evidently has not answered for a while (outage)"
        if self.circuits.any_open():
            return "the projects with events to send are refused (circuit open)"
        return None
