from __future__ import annotations

import asyncio
import time


from forwarder.delivery.batcher import Batcher, FlushLoop, FlushReason
from forwarder.buffer.contract import Chunk, Lease
from forwarder.buffer.memory import MemoryBuffer
from forwarder.config import BatchConfig, BufferConfig
from tests.fakes import FakeClock, RecordingSink
from tests import support


def chunk(project: str, received_at: float, evs: list[bytes], lease: Lease | None = None, first: int = 0) -> Chunk:
    return Chunk(project, received_at, evs, lease or Lease(map(len, evs)), first)


def make(max_events=3, interval=1.0):
    clock = FakeClock()
    wall = FakeClock(1_790_000_000.0)
    return Batcher(BatchConfig(max_events, interval), clock, wall), clock, wall


def test_a_full_batch_is_sealed_at_once_and_the_rest_stays_open():
    b, clock, wall = make(max_events=3)
    sealed = b.add(chunk("p", wall(), support.events(7)))
    assert [len(s.events) for s in sealed] == [3, 3]
    assert all(s.flush_reason is FlushReason.SIZE for s in sealed)
    assert [len(x) for x in b.drain()] == [1]


def test_the_deadline_is_fixed_by_the_first_event_and_not_reset_by_later_ones():
    b, clock, wall = make(max_events=50, interval=1.0)
    b.add(chunk("p", wall(), support.events(1)))
    for _ in range(9):  # a trickle every 100 ms never postpones the flush
        clock.advance(0.1)
        wall.advance(0.1)
        b.add(chunk("p", wall(), support.events(1)))
    assert b.expired() == []
    clock.advance(0.1)
    [batch] = b.expired()
    assert len(batch.events) == 10 and batch.flush_reason is FlushReason.DEADLINE


def test_projects_are_batched_apart_with_their_own_deadlines():
    b, clock, wall = make(max_events=50, interval=1.0)
    b.add(chunk("a", wall(), support.events(2, "a")))
    clock.advance(0.5)
    b.add(chunk("b", wall(), support.events(1, "b")))
    clock.advance(0.5)
    [first] = b.expired()
    assert first.project == "a"
    clock.advance(0.5)
    [second] = b.expired()
    assert second.project == "b" and b.next_deadline() is None


def test_events_that_waited_in_the_buffer_count_toward_their_deadline():
    b, clock, wall = make(max_events=50, interval=1.0)
    b.add(chunk("p", wall() - 5.0, support.events(1)))  # e.g. recovered from disk
    assert [x.project for x in b.expired()] == ["p"]


def test_drain_seals_every_partial_batch_and_keeps_receipts_aligned_with_events():
    b, clock, wall = make(max_events=3)
    lease = Lease([1] * 5)
    full = b.add(chunk("a", wall(), support.events(4), lease, 0))
    b.add(chunk("b", wall(), support.events(1), lease, 4))
    drained = b.drain()
    assert [x.receipt().runs for x in full] == [[(lease, 0, 3)]]
    assert {d.project: d.receipt().runs for d in drained} == {"a": [(lease, 3, 4)], "b": [(lease, 4, 5)]}
    assert all(d.flush_reason is FlushReason.DRAIN for d in drained)


def test_reconfigured_limits_apply_to_new_batches():
    b, clock, wall = make(max_events=3)
    b.reconfigure(BatchConfig(2, 1.0))
    assert [len(s.events) for s in b.add(chunk("p", wall(), support.events(4)))] == [2, 2]


def test_lowering_max_events_does_not_resize_an_open_batch_nor_duplicate_its_events():
    b, clock, wall = make(max_events=50, interval=5.0)
    first = support.events(30, "a")
    assert b.add(chunk("p", wall(), first)) == []
    b.reconfigure(BatchConfig(10, 5.0))
    second = support.events(50, "b")
    sealed = b.add(chunk("p", wall(), second))
    assert [len(x.events) for x in sealed] == [50, 10, 10, 10]
    assert [e for x in sealed for e in x.events] == first + second  # each event once, in order
    assert b.drain() == []


def test_an_open_batch_keeps_the_deadline_it_opened_with_after_a_reload():
    b, clock, wall = make(max_events=50, interval=5.0)
    b.add(chunk("p", wall(), support.events(1)))
    b.reconfigure(BatchConfig(50, 0.05))
    clock.advance(1.0)
    assert b.expired() == []
    b.add(chunk("q", wall(), support.events(1)))  # opened after the reload: the new interval
    clock.advance(0.05)
    assert [x.project for x in b.expired()] == ["q"]


async def test_flush_loop_delivers_a_partial_batch_at_its_deadline_and_drains_on_stop():
    observer = support.observer()
    buffer = MemoryBuffer(BufferConfig(), observer)
    sink = RecordingSink()
    loop = FlushLoop(buffer, Batcher(BatchConfig(50, 0.05)), sink, observer)
    crashes: list[BaseException] = []
    loop.start(crashes.append)
    await buffer.append("p", support.events(3), time.time())
    for _ in range(100):
        if sink.batches:
            break
        await asyncio.sleep(0.01)
    assert [(x.flush_reason, len(x.events)) for x in sink.batches] == [(FlushReason.DEADLINE, 3)]
    await buffer.append("q", support.events(2), time.time())
    assert await loop.stop(1.0)
    assert [(x.project, x.flush_reason) for x in sink.batches[1:]] == [("q", FlushReason.DRAIN)]
    assert crashes == []
    assert observer.metrics.registry.get_sample_value(
        "forwarder_batches_sent_total", {"flush_reason": "drain"}) == 1.0
