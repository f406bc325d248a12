"""The sender: delivers batches with PutProjectEvents and accounts for every event.

Each event ends exactly once, either acknowledged by Evidently or written to the
dead-letter file; only then is it acknowledged to the buffer. ``concurrency``
workers take due batches from the ``schedule``, wait for their ``admission``
(the project's circuit, the endpoint's outage state, the rate), make the call,
and carry out the ``outcome`` plan of its answer through ``effects``.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from forwarder.clock import Clock
from forwarder.config import RetryConfig
from forwarder.delivery.admission import OUTAGE_AFTER, Admission, Lesson, Turn
from forwarder.delivery.batch import Batch
from forwarder.delivery.client import Transport, describe
from forwarder.delivery.effects import Acker, DeadLetterSink, Effects
from forwarder.delivery.outcome import Plan, plan
from forwarder.delivery.rate import RateLimiter
from forwarder.delivery.schedule import Schedule
from forwarder.observability import Observer
from forwarder.tasks import supervise

STALLED_AFTER = 60.0  # seconds without a delivery, with work waiting, before /readyz says so


class Sender:
    """``concurrency`` workers sending batches paced by the adaptive rate limiter."""

    def __init__(self, transport: Transport, buffer: Acker, dead_letters: DeadLetterSink, limiter: RateLimiter,
                 observer: Observer, retry: RetryConfig, concurrency: int, clock: Clock | None = None) -> None:
        self._transport = transport
        self._buffer = buffer
        self._observer = observer
        self._retry = retry
        self._concurrency = concurrency
        self._clock = clock = clock or Clock()
        self._schedule = Schedule(clock.monotonic, fresh_limit=2 * concurrency)
        self.admission = Admission(limiter, observer, retry, clock)
        self._effects = Effects(buffer, dead_letters, self._schedule, retry, observer, clock)
        self._taken: dict[int, Batch] = {}  # batches a worker holds: waiting for a turn or in a call
        self.inflight = 0  # calls in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task[None]] = []

    # lifecycle

    async def start(self, on_crash: Callable[[BaseException], None]) -> None:
        """Start the workers; a worker that dies is reported through ``on_crash``."""
        for i in range(self._concurrency):
            self._workers.append(supervise(asyncio.create_task(self._work(), name=f"forwarder-sender-{i}"), on_crash))

    @property
    def alive(self) -> bool:
        return bool(self._workers) and all(not t.done() for t in self._workers)

    LIVE_KEYS = ("retry.max_elapsed", "retry.initial_backoff", "retry.max_backoff", "retry.not_found_grace")

    async def reconfigure(self, retry: RetryConfig) -> None:
        """New retry limits (live): each batch is judged by them the next time it is taken,
        the next outage probe and circuit wait by the new backoff."""
        self._retry = retry
        self.admission.reconfigure(retry)
        self._effects.reconfigure(retry)

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

    def events_by_project(self) -> tuple[dict[str, int], dict[str, int]]:
        """Read-only, for /status: (events waiting in the schedule, events a worker holds) per project."""
        waiting: dict[str, int] = {}
        taken: dict[str, int] = {}
        for batch in self._schedule.batches():
            waiting[batch.project] = waiting.get(batch.project, 0) + len(batch)
        for batch in self._taken.values():
            taken[batch.project] = taken.get(batch.project, 0) + len(batch)
        return waiting, taken

    def stalled(self) -> str | None:
        """Why nothing has been delivered for a while although there is work, or None."""
        if self._resolved_all() or self._clock.monotonic() - self._effects.last_delivery < STALLED_AFTER:
            return None
        return self.admission.blocked()

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
            answered = await self._attempt(batch)
        except Exception as e:  # one bad batch must not kill the worker; nothing of it was resolved
            self._observer.send_failed(batch.project, len(batch), e)
            self._effects.later(batch)
            return
        if answered is not None:
            outcome, lesson = answered
            self._act_on(lesson)
            # Not caught: effects that can fail on their own (the dead-letter write)
            # are handled where they fail; anything else is a bug and crashes loudly.
            await self._effects.apply(batch, outcome, lesson.reopen_at)

    async def _attempt(self, batch: Batch) -> tuple[Plan, Lesson] | None:
        """Call PutProjectEvents for the batch when it may go; its plan and lesson, None if it did not go."""
        rejection = batch.rejection
        if rejection is not None:  # its dead-letter write failed before: no call, write it again
            await self._effects.dead_letter(batch, *rejection)
            return None
        why = self._expired(batch)
        if why is None:
            async with self.admission.admit(batch.project, id(batch)) as turn:
                if turn.held is not None:
                    self._effects.hold_back(batch, turn.held.due, turn.held.code, turn.held.message)
                    return None
                # As the probe it may have waited out a long outage: then it is not sent.
                why = self._expired(batch) if turn.probe else None
                if why is None:
                    return await self._call(batch, turn)
        self.admission.released(batch.project, id(batch))
        await self._effects.expire(batch, **why)
        return None

    async def _call(self, batch: Batch, turn: Turn) -> tuple[Plan, Lesson]:
        batch.attempt(self._clock.wall())
        started = self._clock.monotonic()
        self.inflight += 1
        try:
            result = await self._transport.put_events(batch.project, batch.events)
        finally:
            self.inflight -= 1
        outcome = plan(result, len(batch))
        self._observer.request_done(outcome.label, self._clock.monotonic() - started)
        duplicates = batch.result(result, outcome)
        if duplicates:
            self._observer.possible_duplicates(duplicates)
        return outcome, self.admission.learn(turn, outcome, describe(result))

    def _act_on(self, lesson: Lesson) -> None:
        """What the endpoint's outage breaker learned: log it; at the end of an outage its retries go at once."""
        last_error = self.admission.last_error
        if lesson.outage_started:
            self._observer.outage_started(OUTAGE_AFTER, self._buffer.depth, last_error)
        if lesson.outage_ended is not None:
            resumed = self._schedule.expedite(lambda b: b.outage_retry)
            self._observer.outage_ended(lesson.outage_ended, lesson.probes, self._buffer.depth, resumed, last_error)

    def _expired(self, batch: Batch) -> dict[str, object] | None:
        """Why the batch ends now (dead-lettered), or None: see Admission.expired."""
        return self.admission.expired(batch.project, batch.last_error[0], batch.first_attempt_at)
