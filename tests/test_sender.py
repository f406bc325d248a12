from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from forwarder.batcher import Batch
from forwarder.config import RetryConfig
from forwarder.observability import Metrics, Observer
from forwarder.ratelimit import RateLimiter
from forwarder.retry import CallResult
from forwarder.sender import Sender

FAST = RetryConfig(max_elapsed=0.5, initial_backoff=0.001, max_backoff=0.01)


class Acker:
    def __init__(self) -> None:
        self.acked: Counter[bytes] = Counter()

    async def ack(self, events, ids):
        self.acked.update(events)


class DeadLetters:
    def __init__(self) -> None:
        self.entries: list[dict] = []

    async def write(self, data: bytes) -> None:
        self.entries.extend(orjson.loads(line) for line in data.splitlines())

    def events(self) -> list[bytes]:
        return [orjson.dumps(e["event"]) for e in self.entries]


class Scripted:
    """A transport answering from a function of (call number, project, events)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list[tuple[str, list[bytes], float]] = []
        self.delivered: Counter[bytes] = Counter()

    async def put_events(self, project, events):
        self.calls.append((project, list(events), time.monotonic()))
        result = self.answer(len(self.calls) - 1, project, events)
        if result.status == 200:
            failed = {i for i, _, _ in result.failed}
            self.delivered.update(e for i, e in enumerate(events) if i not in failed)
        await asyncio.sleep(0)
        return result


def events(n, tag="e"):
    return [orjson.dumps({"data": orjson.dumps({"id": f"{tag}{i}"}).decode(), "timestamp": 1, "type": "t"})
            for i in range(n)]


def batch(project, evs):
    return Batch(project, list(evs), None, time.time())


def make(transport, retry=FAST, concurrency=4, rate=100_000.0):
    observer = Observer(Metrics(CollectorRegistry(), process_collectors=False))
    acker, dead = Acker(), DeadLetters()
    limiter = RateLimiter(rate, rate)
    sender = Sender(transport, acker, dead, retry, limiter, concurrency, observer, rng=random.Random(1))
    return sender, acker, dead, observer.metrics.registry


async def run_all(sender, batches, timeout=5.0):
    await sender.start()
    for b in batches:
        await sender.send(b)
    assert await sender.drain(timeout), "sender did not resolve every batch in time"
    assert await sender.close() == []


async def test_partial_failure_resends_only_throttled_events_and_dead_letters_invalid_ones():
    evs = events(5)

    def answer(n, project, sent):
        if n == 0:
            return CallResult(200, failed=((1, "ThrottlingException", "slow down"),
                                           (3, "ValidationException", "data too big")))
        return CallResult(200)

    transport = Scripted(answer)
    sender, acker, dead, registry = make(transport)
    await run_all(sender, [batch("p", evs)])
    assert transport.calls[1][1] == [evs[1]]
    assert dead.events() == [evs[3]]
    assert dead.entries[0]["errorCode"] == "ValidationException"
    assert dead.entries[0]["errorMessage"] == "data too big"
    assert set(dead.entries[0]) == {"project", "event", "errorCode", "errorMessage", "attempts",
                                    "first_attempt_at", "last_attempt_at"}
    assert acker.acked == Counter(evs)
    assert registry.get_sample_value("forwarder_throttled_total") == 1.0
    assert registry.get_sample_value("forwarder_events_sent_total") == 4.0
    assert registry.get_sample_value("forwarder_events_failed_total", {"code": "ValidationException"}) == 1.0


async def test_one_refused_event_in_a_batch_that_fails_as_a_whole_is_isolated_by_bisection():
    evs = events(50)
    poison = evs[37]

    def answer(n, project, sent):
        if poison in sent:
            return CallResult(400, "ValidationException", "event 37 is malformed")
        return CallResult(200)

    transport = Scripted(answer)
    sender, acker, dead, _ = make(transport)
    await run_all(sender, [batch("p", evs)])
    assert dead.events() == [poison]
    assert dead.entries[0]["errorMessage"] == "event 37 is malformed"
    assert transport.delivered == Counter(e for e in evs if e != poison)
    assert len(transport.calls) <= 2 * 6 + 1  # bisection, not one call per event
    assert acker.acked == Counter(evs)


async def test_throttling_slows_the_send_rate_down():
    def answer(n, project, sent):
        return CallResult(429, "ThrottlingException", "Rate exceeded") if n < 3 else CallResult(200)

    sender, acker, dead, registry = make(Scripted(answer), rate=50.0)
    await run_all(sender, [batch("p", events(1))])
    assert sender.limiter.rate < 50.0
    assert registry.get_sample_value("forwarder_throttled_total") == 3.0
    assert registry.get_sample_value("forwarder_retries_total", {"reason": "throttled"}) == 3.0


async def test_a_project_answering_404_opens_its_circuit_without_stalling_another():
    def answer(n, project, sent):
        return CallResult(404, "ResourceNotFoundException", "no such project") if project == "A" else CallResult(200)

    transport = Scripted(answer)
    retry = RetryConfig(max_elapsed=0.3, initial_backoff=0.001, max_backoff=0.05)
    sender, acker, dead, registry = make(transport, retry=retry, concurrency=2)
    a, b = events(10, "a"), events(200, "b")
    await sender.start()
    await sender.send(batch("A", a))
    start = time.monotonic()
    for i in range(0, 200, 50):
        await sender.send(batch("B", b[i:i + 50]))
    assert await sender.drain(5.0)
    b_done = max(t for p, _, t in transport.calls if p == "B")
    assert b_done - start < 0.2  # B never waited for A's circuit
    a_calls = [t for p, _, t in transport.calls if p == "A"]
    assert 2 <= len(a_calls) < 12  # probes backing off, not a hot loop
    assert sorted(dead.events()) == sorted(a)
    assert {e["errorCode"] for e in dead.entries} == {"ResourceNotFoundException"}
    assert acker.acked == Counter(a + b)
    await sender.close()


async def test_events_that_keep_failing_are_dead_lettered_at_max_elapsed_with_the_last_error():
    transport = Scripted(lambda n, p, s: CallResult(500, "InternalServerException", "boom"))
    sender, acker, dead, registry = make(transport, retry=RetryConfig(0.2, 0.01, 0.05))
    started = time.monotonic()
    await run_all(sender, [batch("p", events(3))])
    assert time.monotonic() - started >= 0.2
    assert [e["errorCode"] for e in dead.entries] == ["InternalServerException"] * 3
    assert dead.entries[0]["attempts"] >= 2
    # a 5xx may have been applied: resending counts as possible duplicates
    assert registry.get_sample_value("forwarder_duplicates_total") >= 3.0


async def test_close_returns_batches_that_could_not_be_delivered():
    gate = asyncio.Event()

    class Stuck:
        async def put_events(self, project, evs):
            await gate.wait()
            return CallResult(200)

    sender, acker, dead, _ = make(Stuck(), concurrency=1)
    await sender.start()
    await sender.send(batch("p", events(2)))
    await sender.send(batch("q", events(3)))
    assert not await sender.drain(0.05)
    left = await sender.close()
    assert sorted(len(b.events) for b in left) == [2, 3]
    assert not acker.acked


async def test_a_crashing_worker_is_reported():
    crashes: list[BaseException] = []
    sender, *_ = make(Scripted(lambda *a: CallResult(200)), concurrency=1)
    sender._on_crash = crashes.append
    await sender.start()
    sender._workers[0].cancel()  # cancellation is not a crash
    await asyncio.gather(*sender._workers, return_exceptions=True)
    assert crashes == [] and not sender.alive
    await sender.close()


OUTCOMES = st.sampled_from(["ok", "partial", "throttle", "server", "timeout", "bad_request", "not_found"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(OUTCOMES, min_size=1, max_size=30), sizes=st.lists(st.integers(1, 50), min_size=1,
                                                                              max_size=6),
       seed=st.integers(0, 1000))
def test_every_event_ends_exactly_once_delivered_or_dead_lettered(script, sizes, seed):
    """Whatever Evidently answers, each event is acknowledged or dead-lettered, never both, never neither."""
    rng = random.Random(seed)

    def answer(n, project, sent):
        kind = script[n % len(script)]
        if kind == "partial":
            failed = tuple((i, rng.choice(["ThrottlingException", "ValidationException", "InternalServerException"]),
                            "entry failed") for i in range(len(sent)) if rng.random() < 0.3)
            return CallResult(200, failed=failed)
        return {
            "ok": CallResult(200), "throttle": CallResult(429, "ThrottlingException"),
            "server": CallResult(500, "InternalServerException"), "timeout": CallResult(0, "timeout"),
            "bad_request": CallResult(400, "ValidationException", "bad"),
            "not_found": CallResult(404, "ResourceNotFoundException"),
        }[kind]

    async def scenario():
        transport = Scripted(answer)
        sender, acker, dead, _ = make(transport, retry=RetryConfig(0.2, 0.001, 0.01))
        batches = [batch(f"p{i % 2}", events(n, f"b{i}-")) for i, n in enumerate(sizes)]
        await run_all(sender, batches, timeout=10.0)
        every = [e for b in batches for e in b.events]
        assert acker.acked == Counter(every)  # each exactly once
        dead_set = Counter(dead.events())
        assert all(c == 1 for c in dead_set.values())
        acknowledged = set(every) - set(dead_set)
        assert acknowledged <= set(transport.delivered)  # acknowledged means Evidently took it
        assert all(len(evs) <= 50 for _, evs, _ in transport.calls)

    asyncio.run(scenario())
