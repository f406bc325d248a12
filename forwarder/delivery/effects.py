"""Carrying an outcome's plan out on a batch: acknowledge, dead-letter, reschedule.

Each effect concerns its own events. The dead-letter write is the one that can
fail on its own: its events then stay ours, to be written again later, never
sent again; delivered events are never touched by it.
"""

from __future__ import annotations

from typing import Protocol

from forwarder.delivery import deadletter
from forwarder.delivery.admission import Admission
from forwarder.delivery.batcher import Batch
from forwarder.buffer.contract import Receipt
from forwarder.clock import Clock
from forwarder.observability import Observer
from forwarder.delivery.outcome import Bisect, Deliver, Hold, Plan, Reject, Resend
from forwarder.delivery.retry import RetryReason, retry_delay
from forwarder.delivery.schedule import Schedule


class Acker(Protocol):
    depth: int

    async def ack(self, receipt: Receipt) -> None: ...


class DeadLetterSink(Protocol):
    async def write(self, data: bytes) -> None: ...


class Effects:
    """Applies plans to batches: the buffer, the dead-letter file and the schedule are its hands."""

    def __init__(self, buffer: Acker, dead_letters: DeadLetterSink, schedule: Schedule, admission: Admission,
                 observer: Observer, clock: Clock) -> None:
        self._buffer = buffer
        self._dead_letters = dead_letters
        self._schedule = schedule
        self._admission = admission
        self._observer = observer
        self._clock = clock
        self.last_delivery = clock.monotonic()

    async def apply(self, batch: Batch, outcome: Plan) -> None:
        for effect in outcome.effects:
            match effect:
                case Deliver(indexes=indexes):
                    await self._buffer.ack(_part(batch, indexes).receipt)
                    self.last_delivery = self._clock.monotonic()
                    self._observer.batch_delivered(batch.project, len(indexes),
                                                   max(0.0, self._clock.wall() - batch.received_at))
                case Reject(indexes=indexes, code=code, message=message):
                    await self.dead_letter(_part(batch, indexes), code, message)
                case Resend(indexes=indexes, reason=reason, retry_after=retry_after, code=code, message=message):
                    again = _part(batch, indexes)
                    again.last_code, again.last_message = code, message
                    self.retry(again, reason, retry_after)
                case Bisect(halves=halves):
                    for half in halves:
                        self.reschedule(batch.subset(list(half)), self._clock.monotonic())
                case Hold(code=code, message=message):
                    self.reschedule(batch, self._admission.refused(batch.project, id(batch), code, message))

    async def dead_letter(self, batch: Batch, code: str, message: str, **why: object) -> None:
        wall = self._clock.wall()
        try:
            await self._dead_letters.write(deadletter.lines(
                batch.project, batch.events, code, message, batch.attempts,
                batch.first_attempt_at or wall, batch.last_attempt_at or wall))
        except Exception as e:  # the events stay ours: write them again later, never send them again
            self._observer.dead_letter_failed(len(batch.events), e)
            batch.reject = (code, message)
            batch.last_reason = RetryReason.INTERNAL
            self.reschedule(batch, self._clock.monotonic() + self.backoff(batch, None))
            return
        batch.reject = None
        await self._buffer.ack(batch.receipt)
        self._observer.dead_lettered(code, len(batch.events), batch.project, message, **why)

    async def expire(self, batch: Batch, **why: object) -> None:
        """Past retry.max_elapsed (or a grace, ``why``): dead-lettered with the last error it got."""
        await self.dead_letter(batch, batch.last_code or "Expired", batch.last_message or "retry.max_elapsed reached",
                               **why)

    def retry(self, batch: Batch, reason: RetryReason, retry_after: float | None) -> None:
        delay = self.backoff(batch, retry_after)
        batch.last_reason = reason
        self._observer.retry_scheduled(reason, len(batch.events), batch.project, delay, batch.last_code,
                                       batch.last_message)
        self.reschedule(batch, self._clock.monotonic() + delay)

    def backoff(self, batch: Batch, retry_after: float | None) -> float:
        retry = self._admission.retry
        return retry_delay(max(0, batch.attempts - 1), retry.initial_backoff, retry.max_backoff, retry_after,
                           self._clock.rng)

    def reschedule(self, batch: Batch, due: float) -> None:
        self._schedule.put_later(batch, due)

    def hold_back(self, batch: Batch, due: float, code: str, message: str) -> None:
        """Its project's circuit is open: no call until ``due``."""
        # The deadline runs from the first deferral too: a project that never
        # heals must not keep its events forever. Should it expire while held
        # back, its dead letter says why the project refused.
        batch.first_attempt_at = batch.first_attempt_at or self._clock.wall()
        batch.last_code, batch.last_message = code, message
        self._schedule.put_later(batch, due)

    def resume_outage_retries(self) -> int:
        """The outage ended: its pushed-back retries are due now."""
        return self._schedule.expedite(lambda b: b.last_reason is not None and b.last_reason.outage)


def _part(batch: Batch, indexes: tuple[int, ...]) -> Batch:
    return batch if len(indexes) == len(batch.events) else batch.subset(list(indexes))

