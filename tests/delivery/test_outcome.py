"""The one decision about an answer, as a table: what a call returned -> what happens to each event."""

from __future__ import annotations

import pytest

from forwarder.delivery.outcome import (Bisect, Deliver, Hold, Plan, RateSignal, Reject, Resend, plan)
from forwarder.delivery.retry import CallResult, RetryReason, no_answer

R = RetryReason
NONE, SUCCESS, THROTTLE = RateSignal.NONE, RateSignal.SUCCESS, RateSignal.THROTTLE
ALL = tuple(range(50))


def resend(reason, code, message="", retry_after=None, answered=True, ambiguous=False, rate=NONE, throttled=0):
    return Plan(reason.value, (Resend(ALL, reason, retry_after, code, message),), rate, answered, throttled,
                ambiguous)


def client_error(effect):
    return Plan("client_error", (effect,), NONE, True, 0, False)


@pytest.mark.parametrize("result, size, expected", [
    (CallResult(200), 50, Plan("ok", (Deliver(ALL),), SUCCESS, True, 0, False)),
    # throttling: the quota is here, the rate learns it
    (CallResult(429, "ThrottlingException", "slow", retry_after=2.0), 50,
     resend(R.THROTTLED, "ThrottlingException", "slow", 2.0, rate=THROTTLE, throttled=1)),
    (CallResult(400, "ThrottlingException"), 50, resend(R.THROTTLED, "ThrottlingException", rate=THROTTLE,
                                                        throttled=1)),
    # 5xx: an outage signal; a 500 may have stored the events, a 503 refused them at the door
    (CallResult(500, "InternalServerException"), 50,
     resend(R.SERVER_ERROR, "InternalServerException", answered=False, ambiguous=True)),
    (CallResult(503, "ServiceUnavailableException", retry_after=1.0), 50,
     resend(R.SERVER_ERROR, "ServiceUnavailableException", retry_after=1.0, answered=False)),
    (CallResult(502), 50, resend(R.SERVER_ERROR, "HTTP502", answered=False, ambiguous=True)),
    # no usable answer
    (no_answer(R.TIMEOUT, "late", maybe_delivered=True), 50,
     resend(R.TIMEOUT, "timeout", "late", answered=False, ambiguous=True)),
    (no_answer(R.CONNECTION, "refused", maybe_delivered=False), 50,
     resend(R.CONNECTION, "connection", "refused", answered=False)),
    (no_answer(R.CONNECTION, "reset", maybe_delivered=True), 50,
     resend(R.CONNECTION, "connection", "reset", answered=False, ambiguous=True)),
    (no_answer(R.PROTOCOL, "html", maybe_delivered=True), 50,
     resend(R.PROTOCOL, "protocol", "html", answered=False, ambiguous=True)),
    (CallResult(408), 50, resend(R.TIMEOUT, "HTTP408", answered=False, ambiguous=True)),
    # results that do not match the batch confirm nothing
    (CallResult(200, failed=((50, "ValidationException", ""),)), 50,
     resend(R.PROTOCOL, "HTTP200", answered=False, ambiguous=True)),
    (CallResult(200, failed=((1, "X", ""), (1, "X", ""))), 50,
     resend(R.PROTOCOL, "HTTP200", answered=False, ambiguous=True)),
    # refused because of some events: bisect, down to one event which is dead-lettered
    (CallResult(400, "ValidationException", "bad"), 50, client_error(Bisect((ALL[:25], ALL[25:])))),
    (CallResult(413, "PayloadTooLargeException"), 3, client_error(Bisect(((0,), (1, 2))))),
    (CallResult(400, "ValidationException", "bad"), 1, client_error(Reject((0,), "ValidationException", "bad"))),
    # the project cannot be written now: its circuit opens
    (CallResult(403, "AccessDeniedException", "no"), 50, client_error(Hold(ALL, "AccessDeniedException", "no"))),
    (CallResult(404, "ResourceNotFoundException"), 50, client_error(Hold(ALL, "ResourceNotFoundException", ""))),
    (CallResult(400, "ExpiredTokenException"), 50, client_error(Hold(ALL, "ExpiredTokenException", ""))),
    (CallResult(401), 50, client_error(Hold(ALL, "HTTP401", ""))),
    # anything else will never succeed
    (CallResult(409, "ConflictException", "no"), 50, client_error(Reject(ALL, "ConflictException", "no"))),
])
def test_what_a_whole_answer_does_to_the_batch(result, size, expected):
    assert plan(result, size) == expected


def test_a_partial_failure_delivers_the_rest_dead_letters_the_hopeless_and_resends_what_can_succeed():
    result = CallResult(200, failed=((1, "ThrottlingException", "slow"), (3, "ValidationException", "bad data"),
                                     (4, "InternalServerException", "oops"), (5, "ValidationException", "bad data")))
    assert plan(result, 6) == Plan("partial", (
        Deliver((0, 2)),
        Reject((3, 5), "ValidationException", "bad data"),
        Resend((1, 4), R.THROTTLED, None, "ThrottlingException", "slow"),
    ), SUCCESS, True, 1, False)


@pytest.mark.parametrize("throttled, size, rate", [(1, 10, SUCCESS), (5, 10, SUCCESS), (6, 10, THROTTLE)])
def test_a_partly_throttled_answer_cuts_the_rate_only_when_most_entries_were_throttled(throttled, size, rate):
    failed = tuple((i, "ThrottlingException", "") for i in range(throttled))
    assert plan(CallResult(200, failed=failed), size).rate is rate


def test_retryable_entries_other_than_throttling_resend_as_partial():
    effects = plan(CallResult(200, failed=((0, "InternalFailure", "x"),)), 2).effects
    assert effects == (Deliver((1,)), Resend((0,), R.PARTIAL, None, "InternalFailure", "x"))


@pytest.mark.parametrize("result, size", [
    (CallResult(200), 7), (CallResult(200, failed=((2, "ValidationException", ""), (5, "ThrottlingException", ""))), 7),
    (CallResult(400, "ValidationException"), 7), (CallResult(503), 7), (CallResult(403), 7), (CallResult(409), 7),
])
def test_every_plan_names_each_position_of_the_batch_exactly_once(result, size):
    positions = []
    for effect in plan(result, size).effects:
        positions.extend(i for half in effect.halves for i in half) if isinstance(effect, Bisect) \
            else positions.extend(effect.indexes)
    assert sorted(positions) == list(range(size))


@pytest.mark.parametrize("result, stored", [
    (CallResult(200), 4), (CallResult(200, failed=((0, "ThrottlingException", ""),)), 3),
    (CallResult(500), 4), (CallResult(503), 0), (CallResult(403), 0),
    (no_answer(R.TIMEOUT, "", maybe_delivered=True), 4), (no_answer(R.CONNECTION, "", maybe_delivered=False), 0),
])
def test_the_events_a_call_may_have_stored_are_the_delivered_ones_or_all_when_unknown(result, stored):
    assert plan(result, 4).stored(4) == stored
