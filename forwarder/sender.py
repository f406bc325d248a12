"""The sender: delivers batches with PutProjectEvents and accounts for every event.

Each event ends exactly once, either acknowledged by Evidently or written to the
dead-letter file; only then is it acknowledged to the buffer. The layers, each
in its own module: ``schedule`` (which batch is due), ``circuits`` (may this
project / this endpoint be called now), ``ratelimit`` (how fast), the transport
(the call), ``outcome`` (what the answer does to the batch). This module runs
``concurrency`` workers through them and carries the plan out.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Protocol

from . import deadletter
from .batcher import Batch
from .circuits import Endpoint, ProjectCircuits
from .client import Transport
from .clock import Clock
from .config import RetryConfig
from .observability import Observer
from .outcome import Bisect, Deliver, Hold, Plan, RateSignal, Reject, Resend, plan
from .ratelimit import RateLimiter
from .retry import RetryReason, retry_delay
from .schedule import Schedule

STALLED_AFTER = 60.0  # seconds without a delivery, with work waiting, before /readyz says so
OUTAGE_AFTER = 3  # consecutive calls without an answer that make an outage
# Longest wait between two probes of an endpoint in outage: it bounds how late
# the end of an outage is noticed, and one call per second is nothing to a service.
MAX_PROBE_INTERVAL = 1.0


class Acker(Protocol):
    depth: int

    async def ack(self, receipt: object) -> None: ...


class DeadLetterSink(Protocol):
    async def write(self, data: bytes) -> None: ...


class Sender:
    """``concurrency`` workers sending batches paced by the adaptive rate limiter."""

    def __init__(self, transport: Transport, buffer: Acker, dead_letters: DeadLetterSink, limiter: RateLimiter,
                 observer: Observer, retry: RetryConfig, concurrency: int, clock: Clock | None = None) -> None:
        self._transport = transport
        self._buffer = buffer
        self._dead_letters = dead_letters
        self.limiter = limiter
        self._observer = observer
        self.retry = retry
        self._concurrency = concurrency
        self._clock = clock = clock or Clock()
        self._now = clock.monotonic
        self._schedule = Schedule(clock.monotonic, fresh_limit=2 * concurrency)
        self._circuits = ProjectCircuits(clock.monotonic, observer.circuit_changed)
        self.endpoint = Endpoint(OUTAGE_AFTER, retry.initial_backoff, MAX_PROBE_INTERVAL, clock.monotonic)
        self._taken: dict[int, Batch] = {}  # batches a worker holds: waiting for a turn or in a call
        self.inflight = 0  # calls in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task[None]] = []
        self._last_delivery = clock.monotonic()

    # lifecycle

    async def start(self, on_crash: Callable[[BaseException], None]) -> None:
        """Start the workers; a worker that dies is reported through ``on_crash``."""
        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                on_crash(task.exception())  # type: ignore[arg-type]

        for i in range(self._concurrency):
            task = asyncio.create_task(self._work(), name=f"forwarder-sender-{i}")
            task.add_done_callback(done)
            self._workers.append(task)

    @property
    def alive(self) -> bool:
        return bool(self._workers) and all(not t.done() for t in self._workers)

    def reconfigure(self, retry: RetryConfig) -> None:
        """New retry limits; a batch's deadline is checked against the limit current when it is next taken."""
        self.retry = retry

    async def send(self, batch: Batch) -> None:
        """Accept a sealed batch; waits while the sender is ``2 * concurrency`` batches behind."""
        self._idle.clear()
        await self._schedule.put_fresh(batch)

    async def drain(self, timeout: float) -> bool:
        """Wait until every accepted batch is resolved, at most ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not self._resolved_all():
                    self._idle.clear()
                    await self._idle.wait()
            return True
        except TimeoutError:
            return False

    def _resolved_all(self) -> bool:
        return len(self._schedule) == 0 and not self._taken

    async def close(self) -> list[Batch]:
        """Stop the workers; return the batches that were not resolved (idempotent)."""
        workers, self._workers = self._workers, []
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        left = list(self._taken.values()) + self._schedule.take_all()
        self._taken.clear()
        return left

    # state read by metrics and readiness

    def oldest(self) -> float | None:
        times = [b.received_at for b in self._taken.values()]
        scheduled = self._schedule.oldest()
        if scheduled is not None:
            times.append(scheduled)
        return min(times, default=None)

    def stalled(self) -> str | None:
        """Why nothing has been delivered for a while although there is work, or None."""
        if self._resolved_all() or self._now() - self._last_delivery < STALLED_AFTER:
            return None
        if self.endpoint.down:
            return "Evidently has not answered for a while (outage)"
        if self._circuits.any_open():
            return "the projects with events to send are refused (circuit open)"
        return None

    # the worker

    async def _work(self) -> None:
        while True:
            batch = await self._schedule.get()
            self._taken[id(batch)] = batch
            # Cancelled or crashed, the batch stays listed: close() reports it.
            await self._handle(batch)
            del self._taken[id(batch)]
            if self._resolved_all():
                self._idle.set()

    async def _handle(self, batch: Batch) -> None:
        try:
            outcome = await self._attempt(batch)
        except Exception as e:  # one bad batch must not kill the worker; nothing of it was resolved
            self._observer.send_failed(batch.project, len(batch.events), e)
            self._reschedule(batch, self._now() + self.retry.max_backoff)
            return
        if outcome is not None:
            # Not caught: effects that can fail on their own (the dead-letter write)
            # are handled where they fail; anything else is a bug and crashes loudly.
            await self._apply(batch, outcome)

    async def _attempt(self, batch: Batch) -> Plan | None:
        """Call PutProjectEvents for the batch when it may go; the plan for its answer, None if it did not go."""
        if batch.reject is not None:  # its dead-letter write failed before: no call, write it again
            await self._dead_letter(batch, *batch.reject)
            return None
        if self._expired(batch):
            self._circuits.released(batch.project, id(batch))
            await self._expire(batch)
            return None
        if self._held_by_circuit(batch):
            return None
        probe, sent_at = await self._turn()
        if probe and self._expired(batch):  # it may have waited out a long outage
            self.endpoint.release()
            await self._expire(batch)
            return None
        if probe:
            self._observer.probe_sent()
        self._count_duplicates(batch)
        wall = self._clock.wall()
        batch.attempts += 1
        batch.first_attempt_at = batch.first_attempt_at or wall
        batch.last_attempt_at = wall
        started = self._now()
        self.inflight += 1
        try:
            result = await self._transport.put_events(batch.project, batch.events)
        finally:
            self.inflight -= 1
        outcome = plan(result, len(batch.events))
        self._observer.request_done(outcome.label, self._now() - started)
        batch.last_code, batch.last_message = result.code, result.message
        batch.ambiguous = outcome.ambiguous
        self._learn(batch.project, outcome, sent_at, probe)
        return outcome

    async def _turn(self) -> tuple[bool, float]:
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
                return probe, sent_at

    async def _expire(self, batch: Batch) -> None:
        await self._dead_letter(batch, batch.last_code or "Expired", batch.last_message or "retry.max_elapsed reached")

    def _expired(self, batch: Batch) -> bool:
        return bool(batch.first_attempt_at) and self._clock.wall() >= batch.first_attempt_at + self.retry.max_elapsed

    def _held_by_circuit(self, batch: Batch) -> bool:
        held = self._circuits.hold(batch.project, id(batch))
        if held is None:
            return False
        due, code, message = held
        # The deadline runs from the first deferral too: a project that never
        # heals must not keep its events forever. Should it expire while held
        # back, its dead letter says why the project refused.
        batch.first_attempt_at = batch.first_attempt_at or self._clock.wall()
        batch.last_code, batch.last_message = code, message
        self._reschedule(batch, due)
        return True

    def _count_duplicates(self, batch: Batch) -> None:
        if batch.ambiguous and not batch.duplicates_counted:
            batch.duplicates_counted = True
            self._observer.possible_duplicates(len(batch.events))

    # what an answer teaches: the endpoint's health, the project's circuit, the rate

    def _learn(self, project: str, outcome: Plan, sent_at: float, probe: bool) -> None:
        if outcome.answered:
            outage = self.endpoint.answered()
            if outage is not None:
                resumed = self._schedule.expedite(lambda b: b.last_reason is not None and b.last_reason.outage)
                self._observer.outage_ended(outage, self.endpoint.probes, self._buffer.depth, resumed)
            if not any(isinstance(e, Hold) for e in outcome.effects):
                self._circuits.answered(project)
        else:
            if self.endpoint.failed(probe):
                self._observer.outage_started(OUTAGE_AFTER, self._buffer.depth)
            self._circuits.unanswered(project)
        if outcome.throttled:
            self._observer.throttled(outcome.throttled, project)
        if outcome.rate is RateSignal.SUCCESS:
            self.limiter.on_success()
        elif outcome.rate is RateSignal.THROTTLE:
            self.limiter.on_throttle(sent_at)

    # carrying the plan out

    async def _apply(self, batch: Batch, outcome: Plan) -> None:
        """Apply each effect to its own events; a failure concerns only that effect's events."""
        for effect in outcome.effects:
            match effect:
                case Deliver(indexes=indexes):
                    delivered = _part(batch, indexes)
                    await self._buffer.ack(delivered.receipt)
                    self._last_delivery = self._now()
                    self._observer.events_sent(len(indexes))
                case Reject(indexes=indexes, code=code, message=message):
                    await self._dead_letter(_part(batch, indexes), code, message)
                case Resend(indexes=indexes, reason=reason, retry_after=retry_after, code=code, message=message):
                    again = _part(batch, indexes)
                    again.last_code, again.last_message = code, message
                    self._retry(again, reason, retry_after)
                case Bisect(halves=halves):
                    for half in halves:
                        self._reschedule(batch.subset(list(half)), self._now())
                case Hold(code=code, message=message):
                    due = self._circuits.refused(batch.project, id(batch), code, message,
                                                 self.retry.initial_backoff, self.retry.max_backoff)
                    self._reschedule(batch, due)

    async def _dead_letter(self, batch: Batch, code: str, message: str) -> None:
        wall = self._clock.wall()
        try:
            await self._dead_letters.write(deadletter.lines(
                batch.project, batch.events, code, message, batch.attempts,
                batch.first_attempt_at or wall, batch.last_attempt_at or wall))
        except Exception as e:  # the events stay ours: write them again later, never send them again
            self._observer.dead_letter_failed(len(batch.events), e)
            batch.reject = (code, message)
            batch.last_reason = RetryReason.INTERNAL
            self._reschedule(batch, self._now() + self._backoff(batch, None))
            return
        batch.reject = None
        await self._buffer.ack(batch.receipt)
        self._observer.dead_lettered(code, len(batch.events), batch.project, message)

    def _retry(self, batch: Batch, reason: RetryReason, retry_after: float | None) -> None:
        delay = self._backoff(batch, retry_after)
        batch.last_reason = reason
        self._observer.retry_scheduled(reason, len(batch.events), batch.project, delay, batch.last_code)
        self._reschedule(batch, self._now() + delay)

    def _backoff(self, batch: Batch, retry_after: float | None) -> float:
        return retry_delay(max(0, batch.attempts - 1), self.retry.initial_backoff, self.retry.max_backoff,
                           retry_after, self._clock.rng)

    def _reschedule(self, batch: Batch, due: float) -> None:
        self._idle.clear()
        self._schedule.put_later(batch, due)


def _part(batch: Batch, indexes: tuple[int, ...]) -> Batch:
    return batch if len(indexes) == len(batch.events) else batch.subset(list(indexes))
