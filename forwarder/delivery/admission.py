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
from forwarder.delivery.blocked import ACCESS_DENIED, NOT_FOUND, Blocked, Refusals, held
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
        self.refusals = Refusals(clock.monotonic)
        self._clock = clock
        self.last_error = ""  # the last call's failure, as a person reads it (outage lines, /status)
        self.last_error_at: float | None = None  # wall clock
        self._unblocked_at = 0.0  # wall clock: access denials held while blocked get a full deadline from here

    @property
    def retry(self) -> RetryConfig:
        return self._retry

    @property
    def blocked_state(self) -> Blocked | None:
        """Every call refused for the forwarder's own identity (credentials, signature, access), or None."""
        return self.refusals.blocked

    def expired(self, project: str, code: str, first_attempt_at: float) -> dict[str, object] | None:
        """Why a batch last refused with ``code`` ends now (dead-lettered), or None to keep it.

        Past retry.max_elapsed from its first attempt (wall clock), it ends; but
        refusals of the forwarder's own identity hold it (an access denial's
        deadline restarts when delivery is unblocked), and a missing project
        ends it after retry.not_found_grace.
        """
        if held(code, self.refusals.blocked):
            return None
        if code == NOT_FOUND:
            since = self.refusals.missing_since(project)
            grace = self._retry.not_found_grace
            if since is not None and self._clock.monotonic() - since >= grace:
                return {"reason": f"the project does not exist (404) for retry.not_found_grace ({grace:g} s)",
                        "grace": grace}
        start = max(first_attempt_at, self._unblocked_at) if code == ACCESS_DENIED else first_attempt_at
        if first_attempt_at and self._clock.wall() >= start + self._retry.max_elapsed:
            return {"reason": "retry.max_elapsed reached"}
        return None

    def _grace_end(self, project: str, code: str, due: float) -> float:
        """A missing project's batch is looked at again when its grace ends, not later."""
        since = self.refusals.missing_since(project) if code == NOT_FOUND else None
        return due if since is None else min(due, since + self._retry.not_found_grace)

    def reconfigure(self, retry: RetryConfig) -> None:
        """New retry settings: the next circuit and the next outage probe use them."""
        self._retry = retry
        self.endpoint.reconfigure(retry.initial_backoff)

    @asynccontextmanager
    async def admit(self, project: str, batch_id: int) -> AsyncIterator[Turn]:
        """A batch's turn: ``held`` set when its circuit holds it back, else it may call now."""
        held_back = self.circuits.hold(project, batch_id)
        if held_back is not None:
            due, code, message = held_back
            yield Turn(project, batch_id, Held(self._grace_end(project, code, due), code, message))
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

    def learn(self, turn: Turn, outcome: Plan, error: str = "") -> Lesson:
        """What the call's answer (``error``: its failure in words, "" for none) teaches the circuits
        and the rate; returns what the sender must act on."""
        turn.settled = True
        if error:
            self.last_error, self.last_error_at = error, self._clock.wall()
        started, ended, reopen_at = False, None, None
        if outcome.answered:
            ended = self.endpoint.answered()
            refusal = outcome.refused_project
            if refusal is None:
                self.circuits.answered(turn.project)
                if self.refusals.answered(turn.project):
                    self._unblocked_at = self._clock.wall()
                    self._observer.delivery_unblocked()
            else:
                reopen_at = self.circuits.refused(turn.project, turn.batch_id, refusal.code, refusal.message,
                                                  self._retry.initial_backoff, self._retry.max_backoff)
                blocked, _ = self.refusals.refused(turn.project, refusal.code, refusal.message)
                if blocked is not None:
                    self._observer.delivery_blocked(blocked.reason, blocked.code, blocked.message)
                reopen_at = self._grace_end(turn.project, refusal.code, reopen_at)
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
        """What keeps calls from going out, if anything: blocked delivery, an outage or open circuits."""
        blocked = self.refusals.blocked
        if blocked is not None:
            return f"delivery blocked: {blocked.code}: {blocked.message}"
        if self.endpoint.down:
            return "Evidently has not answered for a while (outage)"
        if self.circuits.any_open():
            return "the projects with events to send are refused (circuit open)"
        return None
