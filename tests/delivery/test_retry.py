from __future__ import annotations

import random

import pytest

from forwarder.delivery.retry import (RetryReason, backoff, circuit_delay, dead_letter_delay, parse_retry_after,
                                      probe_delay, retry_delay)

R = RetryReason


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


def test_a_failing_dead_letter_write_waits_longer_each_time_up_to_max_backoff():
    assert [dead_letter_delay(n, 0.1, 20.0) for n in (1, 2, 3, 8, 9, 1000)] == [0.1, 0.2, 0.4, 12.8, 20.0, 20.0]
