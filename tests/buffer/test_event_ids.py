"""The eventId the intake answers for an event is the one its lease names at delivery (issue 22):
both buffers, across a read that splits an append, after drop_oldest took the front of one."""

from __future__ import annotations

import uuid

from prometheus_client import CollectorRegistry

from forwarder.buffer.contract import READ_MAX_EVENTS, event_id
from forwarder.buffer.disk.buffer import DiskBuffer
from forwarder.buffer.memory import MemoryBuffer
from forwarder.config import BufferConfig
from forwarder.observability import Metrics, Observer


def observer() -> Observer:
    return Observer(Metrics(CollectorRegistry(), process_collectors=False))


def ids_of(chunks) -> dict[bytes, str | None]:
    return {event: c.lease.event_id(c.first + k) for c in chunks for k, event in enumerate(c.events)}


def answered(append_id: int, events: list[bytes]) -> dict[bytes, str]:
    return {event: event_id(append_id, k) for k, event in enumerate(events)}


def test_event_ids_are_uuid_shaped_and_name_the_append_and_the_index():
    ids = [event_id(a, k) for a in (1, 2**32 + 1) for k in (0, 1)]
    assert all(str(uuid.UUID(i)) == i for i in ids)
    assert ids[0] != ids[1] and ids[0] == ids[2]  # 32 bits of append id: unique within 4 billion appends


async def test_memory_buffer_leases_name_the_event_ids_the_appends_answered():
    buf = MemoryBuffer(BufferConfig(max_events=100), observer())
    appends = [[f"{tag}{i}".encode() for i in range(n)] for tag, n in (("a", 3), ("b", 1), ("c", 4))]
    expected: dict[bytes, str] = {}
    for events in appends:
        expected |= answered(await buf.append("p", events, 1.0), events)
    assert ids_of(await buf.read(0)) == expected


async def test_memory_buffer_keeps_event_ids_after_drop_oldest_took_the_front_of_an_append():
    buf = MemoryBuffer(BufferConfig(max_events=10, when_full="drop_oldest"), observer())
    first = [f"old{i}".encode() for i in range(8)]
    first_id = await buf.append("p", first, 1.0)
    newer = [b"new0", b"new1", b"new2", b"new3"]
    newer_id = await buf.append("p", newer, 2.0)  # the two oldest go
    # the survivors of the first append keep their index in it
    assert ids_of(await buf.read(0)) == {**{e: i for e, i in answered(first_id, first).items() if e in first[2:]},
                                         **answered(newer_id, newer)}


async def test_disk_buffer_leases_name_the_event_ids_even_when_a_read_splits_an_append(tmp_path):
    buf = DiskBuffer(BufferConfig(type="disk", path=str(tmp_path / "buf"), max_events=READ_MAX_EVENTS * 2),
                     observer())
    await buf.open()
    try:
        expected: dict[bytes, str] = {}
        for a in range(4):  # 6000 events: the first read ends inside the fourth append
            events = [f"{a}-{i}".encode() for i in range(1500)]
            expected |= answered(await buf.append("p", events, 100.0 + a), events)
        first = await buf.read(0)
        second = await buf.read(0)
        assert sum(len(c.events) for c in first) == READ_MAX_EVENTS
        assert ids_of(first) | ids_of(second) == expected
    finally:
        await buf.close()


def test_a_batch_names_the_event_ids_of_its_events_across_leases_and_in_its_subsets():
    from forwarder.buffer.contract import Lease
    from forwarder.delivery.batch import Batch

    one = Lease([1] * 4, origins=[(0, 7, 0), (2, 8, 5)])  # positions 2.. continue append 8 from index 5
    two = Lease([1] * 3, origins=[(0, 9, 0)])
    batch = Batch("p", 1.0)
    batch.fill([b"a", b"b", b"c"], one, 1)
    batch.fill([b"d", b"e"], two, 0)
    assert [batch.event_id(i) for i in range(5)] == [
        event_id(7, 1), event_id(8, 5), event_id(8, 6), event_id(9, 0), event_id(9, 1)]
    assert batch.event_id(-1) == event_id(9, 1)
    assert [batch.subset([1, 3]).event_id(i) for i in (0, 1)] == [event_id(8, 5), event_id(9, 0)]
