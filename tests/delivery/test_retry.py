from __future__ import annotations

import random

import pytest

from forwarder.delivery.retry import (CallResult, DeadLetter, Done, OpenCircuit, Partial, Retry, RetryReason, Split,
                             backoff, circuit_delay, classify, no_answer, parse_retry_after, probe_delay,
                             retry_delay)

R = RetryReason


@pytest.mark.parametrize("result, size, decision", [
    (CallResult(200), 50, Done()),
    (CallResult(429, "ThrottlingException", retry_after=2.0), 50, Retry(R.THROTTLED, 2.0)),
    (CallResult(400, "ThrottlingException"), 50, Retry(R.THROTTLED)),
    (CallResult(500, "InternalServerException"), 50, Retry(R.SERVER_ERROR, ambiguous=True)),
    (CallResult(503, "ServiceUnavailableException"), 50, Retry(R.SERVER_ERROR)),
    (no_answer(R.TIMEOUT, "", maybe_delivered=True), 50, Retry(R.TIMEOUT, ambiguous=True)),
    (no_answer(R.CONNECTION, "refused", maybe_delivered=False), 50, Retry(R.CONNECTION)),
    (no_answer(R.CONNECTION, "reset mid-answer", maybe_delivered=True), 50, Retry(R.CONNECTION, ambiguous=True)),
    (no_answer(R.PROTOCOL, "html", maybe_delivered=True), 50, Retry(R.PROTOCOL, ambiguous=True)),
    # results that do not match the batch confirm nothing
    (CallResult(200, failed=((10, "ValidationException", ""),)), 10, Retry(R.PROTOCOL, ambiguous=True)),
    (CallResult(200, failed=((1, "X", ""), (1, "X", ""))), 10, Retry(R.PROTOCOL, ambiguous=True)),
    (CallResult(400, "ValidationException"), 50, Split()),
    (CallResult(400, "ValidationException"), 1, DeadLetter()),
    (CallResult(413, "PayloadTooLargeException"), 2, Split()),
    (CallResult(403, "AccessDeniedException"), 50, OpenCircuit()),
    (CallResult(404, "ResourceNotFoundException"), 50, OpenCircuit()),
    (CallResult(400, "ExpiredTokenException"), 50, OpenCircuit()),
    (CallResult(401, "NoCredentials"), 50, OpenCircuit()),
    (CallResult(409, "ConflictException"), 50, DeadLetter()),
])
def test_whole_request_outcomes(result, size, decision):
    assert classify(result, size) == decision


def test_partial_failure_resends_only_entries_that_can_succeed_later():
    result = CallResult(200, failed=((1, "ThrottlingException", "slow"), (3, "ValidationException", "bad data"),
                                     (4, "InternalServerException", "oops")))
    assert classify(result, 5) == Partial(
        retry=((1, "ThrottlingException", "slow"), (4, "InternalServerException", "oops")),
        dead=((3, "ValidationException", "bad data"),), throttled=1)


def test_backoff_is_full_jitter_under_an_exponential_cap():
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(20.0, 0.1 * 2 ** attempt)
        samples = [backoff(attempt, 0.1, 20.0, rng) for _ in range(200)]
        assert all(0.0 <= s <= cap for s in samples)
        assert max(samples) > cap * 0.8  # the whole range is used, not a fixed delay
    assert backoff(10_000, 0.1, 20.0, rng) <= 20.0  # no overflow on absurd attempts


def test_server_retry_after_wins_over_backoff_but_is_capped():
    assert retry_delay(0, 0.1, 20.0, 3.0) == 3.0
    assert retry_delay(0, 0.1, 20.0, 600.0) == 20.0
    assert 0.0 <= retry_delay(0, 0.1, 20.0, None) <= 0.1


@pytest.mark.parametrize("headers, seconds", [
    ({"x-amz-retry-after": "1500"}, 1.5),
    ({"retry-after": "2"}, 2.0),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
    ({}, None),
])
def test_retry_after_headers(headers, seconds):
    assert parse_retry_after(headers) == seconds


def test_only_unanswered_reasons_are_outage_signals_and_throttling_is_not():
    assert {r for r in RetryReason if r.outage} == {R.SERVER_ERROR, R.TIMEOUT, R.CONNECTION, R.PROTOCOL}


def test_probes_of_an_endpoint_in_outage_double_up_to_their_cap():
    assert [probe_delay(n, 0.1, 1.0) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_circuit_backs_off_exponentially_up_to_max_backoff():
    assert [circuit_delay(n, 0.1, 20.0) for n in (1, 2, 3, 6, 30)] == [1.0, 2.0, 4.0, 20.0, 20.0]
