"""Whether and when a batch may be sent: its project's circuit, the endpoint's health, the rate.

The sender asks before each call (``admit``, a context manager around the call)
and tells afterwards what the answer taught (``learn``), which returns what the
sender must act on (a ``Lesson``). Throttling teaches the rate limiter; an answer
or its absence teaches the endpoint's outage breaker and the project's circuit.
Nothing here sends, reschedules or acknowledges.

Whatever the call does (returns, raises, is cancelled, never happens because its
batch expired), leaving ``admit`` gives back the endpoint's probe slot and the
project circuit's probe unless ``learn`` settled them: a leaked slot would hold
every later call back for good.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from forwarder.clock import Clock
from forwarder.config import RetryConfig
from forwarder.delivery.circuits import Endpoint, ProjectCircuits
from forwarder.delivery.outcome import Plan, RateSignal
from forwarder.delivery.rate import RateLimiter
from forwarder.observability import Observer

OUTAGE_AFTER = 3  # consecutive calls without an answer that make an outage
# Longest wait between two probes of an endpoint in outage: it bounds how late
# the end of an outage is noticed, and one call per second is nothing to a service.
MAX_PROBE_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Held:
    """The project's circuit is open: no call until ``due``; ``code``/``message`` say why."""

    due: float
    code: str
    message: str


@dataclass(slots=True)
class Turn:
    """One batch's passage: held back by its circuit, or free to make one call."""

    project: str
    batch_id: int
    held: Held | None = None
    project_probe: bool = False  # the call probes the project's open circuit
    probe: bool = False  # the call probes the endpoint in outage
    sent_at: float = 0.0  # its time for the rate limiter
    settled: bool = False  # ``learn`` took the answer: nothing to give back


@dataclass(frozen=True, slots=True)
class Lesson:
    """What an answer taught that the sender must act on."""

    outage_started: bool = False
    outage_ended: float | None = None  # seconds the outage lasted, when this answer ended one
    probes: int = 0  # probes sent in the outage
    reopen_at: float | None = None  # the project's circuit opened: when its batch may try again


class Admission:
    """The layers a call passes before it goes out, and what its answer teaches them."""

    def __init__(self, limiter: RateLimiter, observer: Observer, retry: RetryConfig, clock: Clock) -> None:
        self.limiter = limiter
        self._observer = observer
        self._retry = retry
        self.circuits = ProjectCircuits(clock.monotonic, observer.circuit_changed)
        self.endpoint = Endpoint(OUTAGE_AFTER, retry.initial_backoff, MAX_PROBE_INTERVAL, clock.monotonic)

    def reconfigure(self, retry: RetryConfig) -> None:
        """New retry settings: the next circuit and the next outage probe use them."""
        self._retry = retry
        self.endpoint.reconfigure(retry.initial_backoff)

    @asynccontextmanager
    async def admit(self, project: str, batch_id: int) -> AsyncIterator[Turn]:
        """A batch's turn: ``held`` set when its circuit holds it back, else it may call now."""
        held = self.circuits.hold(project, batch_id)
        if held is not None:
            yield Turn(project, batch_id, Held(*held))
            return
        turn = Turn(project, batch_id, project_probe=self.circuits.probing(project))
        try:
            turn.probe, turn.sent_at = await self._wait()
            yield turn
        finally:
            if not turn.settled:
                self._give_back(turn)

    async def _wait(self) -> tuple[bool, float]:
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

    def _give_back(self, turn: Turn) -> None:
        """A turn that taught nothing (no call, or a call that raised or was cancelled): others may probe."""
        if turn.probe:
            self.endpoint.release()
        if turn.project_probe:
            self.circuits.unanswered(turn.project)

    def released(self, project: str, batch_id: int) -> None:
        """A batch left for good (dead-lettered): its circuit forgets it."""
        self.circuits.released(project, batch_id)

    def learn(self, turn: Turn, outcome: Plan) -> Lesson:
        """What the call's answer teaches the circuits and the rate; returns what the sender must act on."""
        turn.settled = True
        started, ended, reopen_at = False, None, None
        if outcome.answered:
            ended = self.endpoint.answered()
            refusal = outcome.refused_project
            if refusal is None:
                self.circuits.answered(turn.project)
            else:
                reopen_at = self.circuits.refused(turn.project, turn.batch_id, refusal.code, refusal.message,
                                                  self._retry.initial_backoff, self._retry.max_backoff)
        else:
            started = self.endpoint.failed(turn.probe)
            self.circuits.unanswered(turn.project)
        self._teach_rate(turn.project, outcome, turn.sent_at)
        return Lesson(started, ended, self.endpoint.probes, reopen_at)

    def _teach_rate(self, project: str, outcome: Plan, sent_at: float) -> None:
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
