"""A batch owns its state: its events with their receipts, and its history."""

from __future__ import annotations

from forwarder.buffer.contract import Lease
from forwarder.delivery.batch import Batch
from forwarder.delivery.outcome import plan
from forwarder.delivery.retry import CallResult, RetryReason, no_answer


def filled(n_first: int, n_second: int) -> tuple[Batch, Lease, Lease]:
    first, second = Lease([1] * 10), Lease([1] * 10)
    batch = Batch("p", 100.0)
    batch.fill([b"a%d" % i for i in range(n_first)], first, 2)
    batch.fill([b"b%d" % i for i in range(n_second)], second, 0)
    return batch, first, second


def test_each_event_keeps_its_place_in_the_buffer_so_the_receipt_follows_any_subset():
    batch, first, second = filled(3, 2)
    assert batch.receipt().runs == [(first, 2, 5), (second, 0, 2)]
    part = batch.subset([1, 3])
    assert part.events == [b"a1", b"b0"]
    assert part.receipt().runs == [(first, 3, 4), (second, 0, 1)]
    assert batch.part(range(5)) is batch


def test_a_subset_carries_the_history_of_the_batch_it_came_from():
    batch, _, _ = filled(2, 2)
    batch.attempt(1000.0)
    batch.retrying(RetryReason.TIMEOUT, "timeout", "late")
    part = batch.subset([0])
    assert (part.attempts, part.first_attempt_at, part.last_error, part.outage_retry) == (
        1, 1000.0, ("timeout", "late"), True)
    part.attempt(1001.0)
    assert batch.attempts == 1  # its own history from then on


def test_only_copies_after_one_that_may_have_been_stored_count_as_duplicates():
    batch, _, _ = filled(3, 0)
    timeout = no_answer(RetryReason.TIMEOUT, "", maybe_delivered=True)
    answers = [(CallResult(503), 0), (timeout, 0), (CallResult(503), 0), (timeout, 3), (CallResult(200), 3)]
    for result, duplicates in answers:
        batch.attempt(1000.0)
        assert batch.result(result, plan(result, 3)) == duplicates


def test_a_deferral_by_an_open_circuit_starts_the_deadline_and_a_failed_write_is_remembered():
    batch, _, _ = filled(1, 0)
    assert not batch.expired(2000.0, 60.0)  # never tried: no deadline yet
    batch.held(1000.0, "AccessDeniedException", "denied")
    assert batch.expired(1060.0, 60.0) and not batch.expired(1059.0, 60.0)
    assert batch.rejected("AccessDeniedException", "denied") == 1
    assert batch.rejected("AccessDeniedException", "denied") == 2
    assert batch.rejection == ("AccessDeniedException", "denied")
