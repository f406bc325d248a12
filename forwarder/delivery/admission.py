"""Whether and when a batch may be sent: its project's circuit, the endpoint's health, the rate.

The sender asks before each call (``hold``, then ``turn``) and tells afterwards
what the answer taught (``learn``). Throttling teaches the rate limiter; an
answer or its absence teaches the endpoint's outage breaker and the project's
circuit. Nothing here sends, reschedules or acknowledges.
"""

from __future__ import annotations

from typing import Callable

from forwarder.delivery.blocked import ACCESS_DENIED, NOT_FOUND, Blocked, Refusals, held
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
        self.refusals = Refusals(clock.monotonic)
        self._clock = clock
        self._waiting = waiting  # events waiting, for the outage log lines
        self._on_recovery = on_recovery  # makes the retries an outage pushed back due; returns how many
        self.last_error = ""  # the last call's failure, as a person reads it (outage lines, /status)
        self.last_error_at: float | None = None  # wall clock
        self._unblocked_at = 0.0  # wall clock: access denials held while blocked get a full deadline from here

    def hold(self, project: str, batch_id: int) -> tuple[float, str, str] | None:
        """None when the batch's project may be called; else (due, code, message) of its open circuit."""
        held_back = self.circuits.hold(project, batch_id)
        if held_back is not None and held_back[1] == NOT_FOUND:
            # Checked again when the grace ends, not at the circuit's next probe.
            since = self.refusals.missing_since(project)
            if since is not None:
                return min(held_back[0], since + self.retry.not_found_grace), held_back[1], held_back[2]
        return held_back

    def refused(self, project: str, batch_id: int, code: str, message: str) -> float:
        """The service refused the project: open its circuit; returns when to try again."""
        due = self.circuits.refused(project, batch_id, code, message, self.retry.initial_backoff,
                                    self.retry.max_backoff)
        blocked, _ = self.refusals.refused(project, code, message)
        if blocked is not None:
            self._observer.delivery_blocked(blocked.reason, blocked.code, blocked.message)
        since = self.refusals.missing_since(project) if code == NOT_FOUND else None
        return due if since is None else min(due, since + self.retry.not_found_grace)

    def expired(self, project: str, code: str, first_attempt_at: float) -> dict[str, object] | None:
        """Why a batch last refused with ``code`` ends now (dead-lettered), or None to keep it.

        Past retry.max_elapsed from its first attempt (wall clock), it ends; but
        refusals of the forwarder's own identity hold it (its deadline restarts
        when delivery is unblocked), and a missing project ends it after
        retry.not_found_grace.
        """
        if held(code, self.refusals.blocked):
            return None
        if code == NOT_FOUND:
            since = self.refusals.missing_since(project)
            grace = self.retry.not_found_grace
            if since is not None and self._clock.monotonic() - since >= grace:
                return {"reason": f"the project does not exist (404) for retry.not_found_grace ({grace:g} s)",
                        "grace": grace}
        start = max(first_attempt_at, self._unblocked_at) if code == ACCESS_DENIED else first_attempt_at
        if first_attempt_at and self._clock.wall() >= start + self.retry.max_elapsed:
            return {"reason": "retry.max_elapsed reached"}
        return None

    @property
    def blocked_state(self) -> Blocked | None:
        return self.refusals.blocked

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

    def learn(self, project: str, outcome: Plan, sent_at: float, probe: bool, error: str = "") -> None:
        """What a call's answer (``error``: its failure in words, "" for none) teaches each layer."""
        if error:
            self.last_error, self.last_error_at = error, self._clock.wall()
        if outcome.answered:
            outage = self.endpoint.answered()
            if outage is not None:
                resumed = self._on_recovery()
                self._observer.outage_ended(outage, self.endpoint.probes, self._waiting(), resumed, self.last_error)
            if not any(isinstance(e, Hold) for e in outcome.effects):
                self.circuits.answered(project)
                if self.refusals.answered(project):
                    self._unblocked_at = self._clock.wall()
                    self._observer.delivery_unblocked()
        else:
            if self.endpoint.failed(probe):
                self._observer.outage_started(OUTAGE_AFTER, self._waiting(), self.last_error)
            self.circuits.unanswered(project)
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
