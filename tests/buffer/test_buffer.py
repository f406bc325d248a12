from __future__ import annotations

import pytest

from forwarder.buffer.contract import BufferFull, Lease, Receipt
from forwarder.buffer.memory import MemoryBuffer
from forwarder.config import BufferConfig
from tests import support


def make(**config):
    observer = support.observer()
    return MemoryBuffer(BufferConfig(**config), observer), observer.metrics.registry


def evs(tag, n):
    return [f"{tag}{i}".encode() for i in range(n)]


async def test_a_full_buffer_refuses_the_whole_request_and_is_ready_again_below_ninety_percent():
    buf, _ = make(max_events=100)
    await buf.append("p", evs("a", 95), 1.0)
    with pytest.raises(BufferFull):
        await buf.append("p", evs("b", 10), 2.0)
    assert buf.depth == 95 and buf.full
    [chunk] = await buf.read(0)
    await buf.ack(support.receipt(chunk, 0, 3))
    assert buf.full  # 92 of 100: not yet below the hysteresis mark
    await buf.ack(support.receipt(chunk, 3))
    assert not buf.full and buf.depth == 0 and buf.nbytes == 0


async def test_drop_oldest_drops_only_unread_events_and_counts_them():
    buf, registry = make(max_events=10, when_full="drop_oldest")
    await buf.append("p", evs("old", 4), 1.0)
    [in_flight] = await buf.read(0)  # these are the batcher's now
    await buf.append("p", evs("mid", 5), 2.0)
    await buf.append("p", evs("new", 3), 3.0)  # needs 2 slots: the 2 oldest unread go
    assert registry.get_sample_value("forwarder_events_dropped_total", {"reason": "buffer_full"}) == 2
    unread = [e for c in await buf.read(0) for e in c.events]
    assert unread == evs("mid", 5)[2:] + evs("new", 3)
    assert list(in_flight.events) == evs("old", 4)
    with pytest.raises(BufferFull):  # nothing unread left to drop
        await buf.append("p", evs("x", 11), 4.0)


async def test_read_waits_for_events_and_times_out_empty():
    buf, _ = make()
    assert await buf.read(0.01) == []
    await buf.append("p", evs("a", 2), 5.0)
    assert buf.oldest_unread() == 5.0
    [chunk] = await buf.read(1.0)
    assert (chunk.project, chunk.received_at, list(chunk.events)) == ("p", 5.0, evs("a", 2))
    buf.stop_reading()
    assert await buf.read(None) == []  # stopped and empty: no wait


async def test_an_event_acknowledged_twice_is_counted_once_and_reported():
    buf, registry = make()
    await buf.append("p", evs("a", 4), 1.0)
    [chunk] = await buf.read(0)
    await buf.ack(support.receipt(chunk, 0, 3))
    await buf.ack(support.receipt(chunk, 2, 4))  # event 2 again: a bug upstream
    assert buf.depth == 0 and buf.nbytes == 0  # never negative, nothing subtracted twice
    assert registry.get_sample_value("forwarder_internal_errors_total", {"kind": "ack_repeated"}) == 1


async def test_one_read_hands_out_one_lease_and_chunks_name_their_place_in_it():
    buf, _ = make()
    await buf.append("p", evs("a", 2), 1.0)
    await buf.append("q", evs("b", 3), 2.0)
    first, second = await buf.read(0)
    assert first.lease is second.lease and (first.first, second.first) == (0, 2)
    await buf.ack(support.receipt(second))
    assert buf.depth == 2 and second.lease.unresolved == 2


def test_a_receipt_subset_names_the_same_events_in_the_batch_order():
    one, two = Lease([1] * 10), Lease([1] * 10)
    receipt = Receipt()
    receipt.add(one, 3, 5)
    receipt.add(one, 5, 6)  # contiguous: merged
    receipt.add(two, 0, 2)
    assert receipt.runs == [(one, 3, 6), (two, 0, 2)]
    assert receipt.subset([0, 2, 3]).runs == [(one, 3, 4), (one, 5, 6), (two, 0, 1)]
    assert receipt.subset([1, 2]).runs == [(one, 4, 6)]
    with pytest.raises(IndexError):
        receipt.subset([5])
