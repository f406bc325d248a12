"""Carrying an outcome's plan out on a batch: acknowledge, dead-letter, reschedule.

Each effect concerns its own events. The dead-letter write is the one that can
fail on its own: its events then stay ours, to be written again later with a
growing wait, never sent again; delivered events are never touched by it.
"""

from __future__ import annotations

from typing import Protocol

from forwarder.buffer.contract import Receipt
from forwarder.clock import Clock
from forwarder.config import RetryConfig
from forwarder.delivery import deadletter
from forwarder.delivery.batch import Batch
from forwarder.delivery.outcome import Bisect, Deliver, Hold, Plan, Reject, Resend
from forwarder.delivery.retry import dead_letter_delay, retry_delay
from forwarder.delivery.schedule import Schedule
from forwarder.observability import Observer, RetryReason


class Acker(Protocol):
    depth: int

    async def ack(self, receipt: Receipt) -> None: ...


class DeadLetterSink(Protocol):
    async def write(self, data: bytes) -> None: ...


class Effects:
    """Applies plans to batches: the buffer, the dead-letter file and the schedule are its hands."""

    def __init__(self, buffer: Acker, dead_letters: DeadLetterSink, schedule: Schedule, retry: RetryConfig,
                 observer: Observer, clock: Clock) -> None:
        self._buffer = buffer
        self._dead_letters = dead_letters
        self._schedule = schedule
        self._retry = retry
        self._observer = observer
        self._clock = clock
        self.last_delivery = clock.monotonic()

    def reconfigure(self, retry: RetryConfig) -> None:
        """New backoff limits, for the next rescheduling."""
        self._retry = retry

    async def apply(self, batch: Batch, outcome: Plan, reopen_at: float | None) -> None:
        """Carry out each effect on its events; ``reopen_at`` is when a refused project's circuit reopens."""
        for effect in outcome.effects:
            match effect:
                case Deliver(indexes=indexes):
                    part = batch.part(indexes)
                    await self._buffer.ack(part.receipt())
                    self.last_delivery = self._clock.monotonic()
                    self._observer.batch_delivered(batch.project, len(indexes),
                                                   max(0.0, self._clock.wall() - batch.received_at),
                                                   lambda: (part.event_id(0), part.event_id(-1)))
                case Reject(indexes=indexes, code=code, message=message):
                    await self.dead_letter(batch.part(indexes), code, message)
                case Resend(indexes=indexes, reason=reason, retry_after=retry_after, code=code, message=message):
                    again = batch.part(indexes)
                    again.retrying(reason, code, message)
                    self._resend(again, reason, retry_after)
                case Bisect(halves=halves):
                    for half in halves:
                        self._schedule.put_later(batch.subset(half), self._clock.monotonic())
                case Hold():
                    assert reopen_at is not None, "a refused project's batch needs its circuit's reopening time"
                    self._schedule.put_later(batch, reopen_at)

    async def dead_letter(self, batch: Batch, code: str, message: str, **why: object) -> None:
        """Write the events to the dead-letter file, then acknowledge them; a failed write is tried again later."""
        wall = self._clock.wall()
        event_ids = [batch.event_id(i) for i in range(len(batch))]
        try:
            await self._dead_letters.write(deadletter.lines(
                batch.project, batch.events, code, message, batch.attempts,
                batch.first_attempt_at or wall, batch.last_attempt_at or wall, event_ids))
        except Exception as e:  # the events stay ours: write them again later, never send them again
            failures = batch.rejected(code, message)
            self._observer.dead_letter_failed(len(batch), e)
            delay = dead_letter_delay(failures, self._retry.initial_backoff, self._retry.max_backoff)
            self._schedule.put_later(batch, self._clock.monotonic() + delay)
            return
        await self._buffer.ack(batch.receipt())
        self._observer.dead_lettered(code, len(batch), batch.project, message, event_ids,  # type: ignore[arg-type]
                                     **why)

    async def expire(self, batch: Batch, **why: object) -> None:
        """Past retry.max_elapsed (or a missing project's grace, ``why``): dead-lettered with its last error."""
        code, message = batch.last_error
        await self.dead_letter(batch, code or "Expired", message or "retry.max_elapsed reached", **why)

    def _resend(self, batch: Batch, reason: RetryReason, retry_after: float | None) -> None:
        delay = self._backoff(batch, retry_after)
        self._observer.retry_scheduled(reason, len(batch), batch.project, delay, *batch.last_error)
        self._schedule.put_later(batch, self._clock.monotonic() + delay)

    def _backoff(self, batch: Batch, retry_after: float | None) -> float:
        return retry_delay(max(0, batch.attempts - 1), self._retry.initial_backoff, self._retry.max_backoff,
                           retry_after, self._clock.rng)

    def hold_back(self, batch: Batch, due: float, code: str, message: str) -> None:
        """Its project's circuit is open (refused with ``code``): no call until ``due``."""
        batch.held(self._clock.wall(), code, message)
        self._schedule.put_later(batch, due)

    def later(self, batch: Batch) -> None:
        """Its attempt failed inside the forwarder: try again after its next backoff step."""
        self._schedule.put_later(batch, self._clock.monotonic() + self._backoff(batch, None))
