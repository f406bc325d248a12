"""What one call's answer does to its batch: one pure, table-driven decision (Vector's ``RetryAction``).

``plan(result, size)`` is the only code that reads what a call returned. Its
effects name batch positions, come in a fixed order (acknowledge, dead-letter,
then the in-memory reschedulings that cannot fail), and cover every event of the
batch exactly once, so a failure while applying one effect concerns only that
effect's events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from forwarder.delivery.retry import CallResult
from forwarder.observability import RetryReason

# Error codes inside a 200 (eventResults[i].errorCode) worth sending again.
RETRYABLE_ENTRY_CODES = frozenset({
    "ThrottlingException", "InternalServerException", "ServiceUnavailableException",
    "InternalFailure", "ServiceUnavailable", "RequestTimeout",
})
THROTTLE_CODES = frozenset({
    "ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
    "SlowDown", "ProvisionedThroughputExceededException",
})
# Whole-request errors that mean "this caller cannot write this project now":
# wrong permissions, a missing project, credentials that expired or are refused.
CIRCUIT_CODES = frozenset({
    "AccessDeniedException", "ResourceNotFoundException", "ExpiredTokenException",
    "UnrecognizedClientException", "InvalidSignatureException", "IncompleteSignatureException",
    "MissingAuthenticationTokenException", "InvalidClientTokenId", "RequestExpired",
    "NoCredentials", "SignatureDoesNotMatch",
})
SPLIT_CODES = frozenset({"ValidationException", "SerializationException", "PayloadTooLargeException"})


class RateSignal(enum.Enum):
    """What the rate controller learns from a call."""

    NONE = "none"  # nothing: an outage, or an answer about the events rather than the rate
    SUCCESS = "success"
    THROTTLE = "throttle"


@dataclass(frozen=True, slots=True)
class Deliver:
    """Evidently took these events: acknowledge them to the buffer."""

    indexes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Reject:
    """Nothing will make Evidently take these: write them to the dead-letter file."""

    indexes: tuple[int, ...]
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Resend:
    """Send these again after a backoff (or the service's Retry-After)."""

    indexes: tuple[int, ...]
    reason: RetryReason
    retry_after: float | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Bisect:
    """The service refused the batch because of some of its events: send each half on its own."""

    halves: tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class Hold:
    """The project cannot be written now: open its circuit and wait with these events."""

    indexes: tuple[int, ...]
    code: str
    message: str


Effect = Deliver | Reject | Resend | Bisect | Hold


@dataclass(frozen=True, slots=True)
class Plan:
    label: str  # the outcome label of forwarder_request_duration_seconds
    effects: tuple[Effect, ...]
    rate: RateSignal
    answered: bool  # the service answered: not an outage signal
    throttled: int  # throttling answers to count (whole request or entries)
    ambiguous: bool  # the events may have been stored although not confirmed

    @property
    def refused_project(self) -> Hold | None:
        """The Hold of a project the service refused, if that is what the answer says."""
        return next((e for e in self.effects if isinstance(e, Hold)), None)

    def stored(self, size: int) -> int:
        """How many of the batch's events this call may have stored (delivered or perhaps delivered)."""
        if self.ambiguous:
            return size
        return sum(len(e.indexes) for e in self.effects if isinstance(e, Deliver))


def plan(result: CallResult, size: int) -> Plan:
    """What happens to a batch of ``size`` events after one call returned ``result``."""
    if result.unanswered is not None:
        return _resend(result, size, result.unanswered, ambiguous=result.maybe_delivered)
    if result.status == 200:
        return _answered(result, size)
    for matches, decide in WHOLE_REQUEST:
        if matches(result):
            return decide(result, size)
    return _reject(result, size)


# --- a whole request refused: the first row whose condition holds decides; no row, dead letter.

def _throttled(result: CallResult, size: int) -> Plan:
    return _resend(result, size, RetryReason.THROTTLED, retry_after=result.retry_after)


def _server_error(result: CallResult, size: int) -> Plan:
    # A 503 is refused at the door; a 500 may have failed after storing the events.
    refused = result.status == 503 or result.code == "ServiceUnavailableException"
    return _resend(result, size, RetryReason.SERVER_ERROR, retry_after=result.retry_after, ambiguous=not refused)


def _project_refused(result: CallResult, size: int) -> Plan:
    return _client_error(Hold(tuple(range(size)), _code(result), result.message))


def _bisect(result: CallResult, size: int) -> Plan:
    if size < 2:
        return _reject(result, size)
    everything = tuple(range(size))
    return _client_error(Bisect((everything[:size // 2], everything[size // 2:])))


def _timed_out(result: CallResult, size: int) -> Plan:
    return _resend(result, size, RetryReason.TIMEOUT, ambiguous=True)


WHOLE_REQUEST: tuple[tuple[Callable[[CallResult], bool], Callable[[CallResult, int], Plan]], ...] = (
    (lambda r: r.status == 429 or r.code in THROTTLE_CODES, _throttled),
    (lambda r: r.status >= 500, _server_error),
    (lambda r: r.code in CIRCUIT_CODES or r.status in (401, 403, 404), _project_refused),
    (lambda r: r.code in SPLIT_CODES or r.status in (400, 413), _bisect),
    (lambda r: r.status == 408, _timed_out),
)


def _code(result: CallResult) -> str:
    return result.code or f"HTTP{result.status}"


def _client_error(effect: Effect) -> Plan:
    return Plan("client_error", (effect,), RateSignal.NONE, True, 0, False)


def _reject(result: CallResult, size: int) -> Plan:
    return _client_error(Reject(tuple(range(size)), _code(result), result.message))


def _resend(result: CallResult, size: int, reason: RetryReason, retry_after: float | None = None,
            ambiguous: bool = False) -> Plan:
    throttled = reason is RetryReason.THROTTLED
    return Plan(reason.value, (Resend(tuple(range(size)), reason, retry_after, _code(result), result.message),),
                RateSignal.THROTTLE if throttled else RateSignal.NONE, not reason.outage, int(throttled), ambiguous)


# --- a 200: each entry decides for its event.

def _answered(result: CallResult, size: int) -> Plan:
    if not result.failed:
        return Plan("ok", (Deliver(tuple(range(size))),), RateSignal.SUCCESS, True, 0, False)
    indexes = [i for i, _, _ in result.failed]
    if len(set(indexes)) != len(indexes) or not all(0 <= i < size for i in indexes):
        # Results that do not match the batch confirm nothing (the client checks this too).
        return _resend(result, size, RetryReason.PROTOCOL, ambiguous=True)
    return _partial(result.failed, size)


def _partial(failed: tuple[tuple[int, str, str], ...], size: int) -> Plan:
    retry = [f for f in failed if f[1] in RETRYABLE_ENTRY_CODES]
    throttled = sum(1 for _, code, _ in failed if code in THROTTLE_CODES)
    failed_at = {i for i, _, _ in failed}
    effects: list[Effect] = []
    ok = tuple(i for i in range(size) if i not in failed_at)
    if ok:
        effects.append(Deliver(ok))
    by_error: dict[tuple[str, str], list[int]] = {}
    for i, code, message in failed:
        if code not in RETRYABLE_ENTRY_CODES:
            by_error.setdefault((code, message), []).append(i)
    effects.extend(Reject(tuple(sorted(indexes)), code, message) for (code, message), indexes in by_error.items())
    if retry:
        _, code, message = retry[0]
        reason = RetryReason.THROTTLED if throttled else RetryReason.PARTIAL
        effects.append(Resend(tuple(sorted(i for i, _, _ in retry)), reason, None, code, message))
    # A 200 that took most of the batch says the request rate is fine: the
    # throttled entries are retried with backoff. Cutting the rate on every
    # partly throttled 200 drove it to the floor (docs/architecture.md, "Rate").
    rate = RateSignal.THROTTLE if throttled * 2 > size else RateSignal.SUCCESS
    return Plan("partial", tuple(effects), rate, True, throttled, False)
