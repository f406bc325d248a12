"""The sender: delivers batches with PutProjectEvents and accounts for every event.

Each event ends exactly once, either acknowledged by Evidently or written to the
dead-letter file; only then is it acknowledged to the buffer. Decisions come
from ``retry.classify``; this module carries them out: scheduling retries
without holding a concurrency slot, bisecting refused batches, per-project
circuit breakers, and feeding throttling back into the rate limiter.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from . import deadletter
from .batcher import Batch
from .client import Transport
from .config import RetryConfig
from .observability import Observer
from .ratelimit import RateLimiter
from .retry import (CallResult, DeadLetter, Done, OpenCircuit, Partial, Retry, Split, THROTTLE_CODES,
                    circuit_delay, classify, retry_delay)
from .wakeup import Wakeup

PROBE_WAIT = 0.25  # seconds a batch waits while its project's probe is in flight
IDLE_HEALTHY = 60.0  # seconds without any success before "every circuit open" counts


class Acker(Protocol):
    async def ack(self, events: list[bytes], ids: list[int] | None) -> None: ...


class DeadLetterSink(Protocol):
    async def write(self, data: bytes) -> None: ...


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    code: str = ""  # the refusal that opened it, for the batches it holds back
    message: str = ""


class _Schedule:
    """Batches due now or later; fresh batches are bounded, retries are not
    (they are already counted in the buffer's bounds)."""

    def __init__(self, clock: Callable[[], float], fresh_limit: int) -> None:
        self._clock = clock
        self._fresh_limit = fresh_limit
        self._heap: list[tuple[float, int, Batch, bool]] = []
        self._seq = itertools.count()
        self._fresh = 0
        self._wake = Wakeup()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._heap)

    async def put_fresh(self, batch: Batch) -> None:
        while self._fresh >= self._fresh_limit:
            self._room.clear()
            await self._room.wait()
        self._fresh += 1
        self._push(self._clock(), batch, True)

    def put_later(self, batch: Batch, due: float) -> None:
        self._push(due, batch, False)

    def _push(self, due: float, batch: Batch, fresh: bool) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), batch, fresh))
        self._wake.set()

    async def get(self) -> Batch:
        while True:
            if self._heap and self._heap[0][0] <= self._clock():
                _, _, batch, fresh = heapq.heappop(self._heap)
                if fresh:
                    self._fresh -= 1
                    self._room.set()
                return batch
            timeout = self._heap[0][0] - self._clock() if self._heap else None
            self._wake.clear()
            await self._wake.wait(timeout)

    def take_all(self) -> list[Batch]:
        batches = [entry[2] for entry in self._heap]
        self._heap.clear()
        return batches

    def oldest(self) -> float | None:
        return min((entry[2].received_at for entry in self._heap), default=None)


class Sender:
    """``concurrency`` workers sending batches paced by the adaptive rate limiter."""

    def __init__(self, transport: Transport, buffer: Acker, dead_letters: DeadLetterSink,
                 retry: RetryConfig, limiter: RateLimiter, concurrency: int, observer: Observer,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None,
                 on_crash: Callable[[BaseException], None] | None = None) -> None:
        self._transport = transport
        self._buffer = buffer
        self._dead_letters = dead_letters
        self.retry = retry
        self.limiter = limiter
        self._concurrency = concurrency
        self._observer = observer
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._on_crash = on_crash
        self._schedule = _Schedule(clock, fresh_limit=2 * concurrency)
        self._circuits: dict[str, _Circuit] = {}
        self._inflight_batches: dict[int, Batch] = {}
        self._busy = 0  # batches taken by a worker and not yet resolved or rescheduled
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task[None]] = []
        self._last_ok = clock()

    # lifecycle

    async def start(self) -> None:
        """Start the workers; a worker that dies is reported through on_crash."""
        for i in range(self._concurrency):
            task = asyncio.create_task(self._work(), name=f"forwarder-sender-{i}")
            task.add_done_callback(self._worker_done)
            self._workers.append(task)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and self._on_crash is not None:
            self._on_crash(task.exception())  # type: ignore[arg-type]

    @property
    def alive(self) -> bool:
        return bool(self._workers) and all(not t.done() for t in self._workers)

    async def send(self, batch: Batch) -> None:
        """Accept a sealed batch; waits while the sender is ``2 * concurrency`` batches behind."""
        self._idle.clear()
        await self._schedule.put_fresh(batch)

    async def drain(self, timeout: float) -> bool:
        """Wait until every accepted batch is resolved, at most ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._wait_idle(), timeout)
            return True
        except TimeoutError:
            return False

    async def _wait_idle(self) -> None:
        while not (len(self._schedule) == 0 and self._busy == 0):
            self._idle.clear()
            await self._idle.wait()

    async def close(self) -> list[Batch]:
        """Stop the workers; return the batches that were not resolved (idempotent)."""
        workers, self._workers = self._workers, []
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        left = list(self._inflight_batches.values()) + self._schedule.take_all()
        self._inflight_batches.clear()
        return left

    # state read by metrics and readiness

    @property
    def inflight(self) -> int:
        return len(self._inflight_batches)

    def oldest(self) -> float | None:
        times = [b.received_at for b in self._inflight_batches.values()]
        scheduled = self._schedule.oldest()
        if scheduled is not None:
            times.append(scheduled)
        return min(times, default=None)

    def all_circuits_open(self) -> bool:
        now = self._clock()
        return (any(c.open_until > now for c in self._circuits.values())
                and now - self._last_ok > IDLE_HEALTHY)

    # the worker

    async def _work(self) -> None:
        while True:
            batch = await self._schedule.get()
            self._busy += 1
            try:
                await self._attempt(batch)
            except Exception as e:  # one bad batch must not kill the worker
                self._observer.log.exception("send_failed", project=batch.project, events=len(batch.events),
                                             error=repr(e))
                self._reschedule(batch, self._clock() + self.retry.max_backoff)
            finally:
                self._busy -= 1
                if self._busy == 0 and len(self._schedule) == 0:
                    self._idle.set()

    async def _attempt(self, batch: Batch) -> None:
        wall = self._wall()
        if self._expired(batch, wall):
            await self._dead_letter(batch, batch.last_code or "Expired",
                                    batch.last_message or "retry.max_elapsed reached")
            return
        if self._circuit_blocks(batch):
            return
        sent_at = await self.limiter.acquire()
        wall = self._wall()
        if batch.ambiguous and not batch.duplicates_counted:
            batch.duplicates_counted = True
            self._observer.possible_duplicates(len(batch.events))
        batch.attempts += 1
        batch.first_attempt_at = batch.first_attempt_at or wall
        batch.last_attempt_at = wall
        key = id(batch)
        self._inflight_batches[key] = batch
        started = self._clock()
        try:
            result = await self._transport.put_events(batch.project, batch.events)
        except asyncio.CancelledError:
            raise  # the batch stays listed: close() reports it
        except BaseException:
            self._inflight_batches.pop(key, None)
            raise
        self._inflight_batches.pop(key, None)
        await self._resolve(batch, result, sent_at, self._clock() - started)

    def _expired(self, batch: Batch, wall: float) -> bool:
        return bool(batch.first_attempt_at) and wall >= batch.first_attempt_at + self.retry.max_elapsed

    def _circuit_blocks(self, batch: Batch) -> bool:
        """Defer the batch while its project's circuit is open or being probed."""
        circuit = self._circuits.get(batch.project)
        if circuit is None:
            return False
        now = self._clock()
        if circuit.open_until > now or circuit.probing:
            # The deadline runs from the first deferral too: a project that never
            # heals must not keep its events forever.
            batch.first_attempt_at = batch.first_attempt_at or self._wall()
            # should it expire while held back, its dead letter says why the project refused
            batch.last_code, batch.last_message = circuit.code, circuit.message
            due = circuit.open_until if circuit.open_until > now else now + PROBE_WAIT
            self._reschedule(batch, due)
            return True
        circuit.probing = True  # this batch is the probe
        return False

    # outcomes

    async def _resolve(self, batch: Batch, result: CallResult, sent_at: float, seconds: float) -> None:
        decision = classify(result, len(batch.events))
        self._observer.request_done(_outcome(result), seconds)
        batch.last_code, batch.last_message = result.code, result.message
        batch.ambiguous = isinstance(decision, Retry) and decision.ambiguous
        if not isinstance(decision, OpenCircuit):
            self._close_circuit(batch.project)
        if isinstance(decision, Done):
            self._last_ok = self._clock()
            self.limiter.on_success()
            await self._delivered(batch, batch.events, batch.ids)
        elif isinstance(decision, Partial):
            await self._partial(batch, decision, sent_at)
        elif isinstance(decision, Retry):
            if decision.reason == "throttled":
                self._observer.throttled(1, batch.project)
            # Throttling, 5xx and an unreachable endpoint all mean "send less":
            # otherwise thousands of batches backing off on their own clocks
            # keep calling a service that is down at the full send rate.
            self.limiter.on_throttle(sent_at)
            self._retry(batch, decision.reason, decision.retry_after)
        elif isinstance(decision, Split):
            half = len(batch.events) // 2
            now = self._clock()
            self._reschedule(batch.subset(list(range(half))), now)
            self._reschedule(batch.subset(list(range(half, len(batch.events)))), now)
        elif isinstance(decision, OpenCircuit):
            self._open_circuit(batch)
        elif isinstance(decision, DeadLetter):
            await self._dead_letter(batch, result.code or f"HTTP{result.status}", result.message)

    async def _partial(self, batch: Batch, decision: Partial, sent_at: float) -> None:
        self._last_ok = self._clock()
        if decision.throttled:
            self._observer.throttled(decision.throttled, batch.project)
        # A 200 that took most of the batch says the request rate is fine: the
        # throttled entries are retried with backoff. Cutting the rate on every
        # partly throttled 200 drove it to the floor at 20% random entry throttling.
        if decision.throttled * 2 > len(batch.events):
            self.limiter.on_throttle(sent_at)
        else:
            self.limiter.on_success()
        failed = {i for i, _, _ in decision.retry} | {i for i, _, _ in decision.dead}
        ok = [i for i in range(len(batch.events)) if i not in failed]
        if ok:
            delivered = batch.subset(ok)
            await self._delivered(delivered, delivered.events, delivered.ids)
        by_code: dict[tuple[str, str], list[int]] = {}
        for i, code, message in decision.dead:
            by_code.setdefault((code, message), []).append(i)
        for (code, message), indexes in by_code.items():
            await self._dead_letter(batch.subset(indexes), code, message)
        if decision.retry:
            again = batch.subset([i for i, _, _ in decision.retry])
            _, again.last_code, again.last_message = decision.retry[0]
            self._retry(again, "throttled" if decision.throttled else "partial", None)

    async def _delivered(self, batch: Batch, events: list[bytes], ids: list[int] | None) -> None:
        await self._buffer.ack(events, ids)
        self._observer.events_sent(len(events))

    async def _dead_letter(self, batch: Batch, code: str, message: str) -> None:
        wall = self._wall()
        await self._dead_letters.write(deadletter.lines(
            batch.project, batch.events, code, message, batch.attempts,
            batch.first_attempt_at or wall, batch.last_attempt_at or wall))
        await self._buffer.ack(batch.events, batch.ids)
        self._observer.dead_lettered(code, len(batch.events), batch.project, message)

    def _retry(self, batch: Batch, reason: str, retry_after: float | None) -> None:
        delay = retry_delay(max(0, batch.attempts - 1), self.retry.initial_backoff, self.retry.max_backoff,
                            retry_after, self._rng)
        self._observer.retry_scheduled(reason, len(batch.events), batch.project, delay, batch.last_code)
        self._reschedule(batch, self._clock() + delay)

    def _reschedule(self, batch: Batch, due: float) -> None:
        self._idle.clear()
        self._schedule.put_later(batch, due)

    def _open_circuit(self, batch: Batch) -> None:
        circuit = self._circuits.setdefault(batch.project, _Circuit())
        circuit.failures += 1
        circuit.probing = False
        circuit.code, circuit.message = batch.last_code, batch.last_message
        delay = circuit_delay(circuit.failures, self.retry.initial_backoff, self.retry.max_backoff)
        circuit.open_until = self._clock() + delay
        self._observer.circuit_changed(batch.project, True, batch.last_code, delay)
        self._reschedule(batch, circuit.open_until)

    def _close_circuit(self, project: str) -> None:
        circuit = self._circuits.pop(project, None)
        if circuit is not None:
            self._observer.circuit_changed(project, False)


def _outcome(result: CallResult) -> str:
    if result.status == 200:
        return "partial" if result.failed else "ok"
    if result.status == 0:
        return result.code or "connection"
    if result.status == 429 or result.code in THROTTLE_CODES:
        return "throttled"
    return "server_error" if result.status >= 500 else "client_error"
