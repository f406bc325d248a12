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

from forwarder.delivery.admission import Admission
from forwarder.delivery.batcher import Batch
from forwarder.delivery.client import Transport, describe
from forwarder.clock import Clock
from forwarder.config import RetryConfig
from forwarder.delivery.effects import Acker, DeadLetterSink, Effects
from forwarder.observability import Observer
from forwarder.delivery.outcome import Plan, plan
from forwarder.delivery.rate import RateLimiter
from forwarder.delivery.schedule import Schedule

STALLED_AFTER = 60.0  # seconds without a delivery, with work waiting, before /readyz says so


class Sender:
    """``concurrency`` workers sending batches paced by the adaptive rate limiter."""

    def __init__(self, transport: Transport, buffer: Acker, dead_letters: DeadLetterSink, limiter: RateLimiter,
                 observer: Observer, retry: RetryConfig, concurrency: int, clock: Clock | None = None) -> None:
        self._transport = transport
        self._observer = observer
        self._concurrency = concurrency
        self._clock = clock = clock or Clock()
        self._schedule = Schedule(clock.monotonic, fresh_limit=2 * concurrency)
        self.admission = Admission(limiter, observer, retry, clock, lambda: buffer.depth,
                                   lambda: self._effects.resume_outage_retries())
        self._effects = Effects(buffer, dead_letters, self._schedule, self.admission, observer, clock)
        self._taken: dict[int, Batch] = {}  # batches a worker holds: waiting for a turn or in a call
        self.inflight = 0  # calls in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task[None]] = []

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
        """New retry limits (live): each batch is judged by them the next time it is taken."""
        self.admission.retry = retry

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

    @property
    def limiter(self) -> RateLimiter:
        return self.admission.limiter

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
            waiting[batch.project] = waiting.get(batch.project, 0) + len(batch.events)
        for batch in self._taken.values():
            taken[batch.project] = taken.get(batch.project, 0) + len(batch.events)
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
            outcome = await self._attempt(batch)
        except Exception as e:  # one bad batch must not kill the worker; nothing of it was resolved
            self._observer.send_failed(batch.project, len(batch.events), e)
            self._effects.reschedule(batch, self._clock.monotonic() + self.admission.retry.max_backoff)
            return
        if outcome is not None:
            # Not caught: effects that can fail on their own (the dead-letter write)
            # are handled where they fail; anything else is a bug and crashes loudly.
            await self._effects.apply(batch, outcome)

    async def _attempt(self, batch: Batch) -> Plan | None:
        """Call PutProjectEvents for the batch when it may go; the plan for its answer, None if it did not go."""
        if batch.reject is not None:  # its dead-letter write failed before: no call, write it again
            await self._effects.dead_letter(batch, *batch.reject)
            return None
        why = self._expired(batch)
        if why is not None:
            self.admission.released(batch.project, id(batch))
            await self._effects.expire(batch, **why)
            return None
        held = self.admission.hold(batch.project, id(batch))
        if held is not None:
            self._effects.hold_back(batch, *held)
            return None
        probe, sent_at = await self.admission.turn()
        why = self._expired(batch) if probe else None
        if why is not None:  # it may have waited out a long outage
            self.admission.release()
            await self._effects.expire(batch, **why)
            return None
        duplicates = batch.attempt(self._clock.wall())
        if duplicates:
            self._observer.possible_duplicates(duplicates)
        started = self._clock.monotonic()
        self.inflight += 1
        try:
            result = await self._transport.put_events(batch.project, batch.events)
        finally:
            self.inflight -= 1
        outcome = plan(result, len(batch.events))
        self._observer.request_done(outcome.label, self._clock.monotonic() - started)
        batch.last_code, batch.last_message = result.code, result.message
        batch.ambiguous = outcome.ambiguous
        self.admission.learn(batch.project, outcome, sent_at, probe, describe(result))
        return outcome

    def _expired(self, batch: Batch) -> dict[str, object] | None:
        """Why the batch ends now (dead-lettered), or None."""
        return self.admission.expired(batch.project, batch.last_code, batch.first_attempt_at)
