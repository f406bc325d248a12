"""Retry policy: pure, table-driven decisions about a PutProjectEvents outcome.

``classify`` maps what one call returned to what happens to its events (Vector's
``RetryAction``); ``backoff`` is capped exponential with full jitter. Exactly one
layer retries: botocore's own retries are off (see ``client.py``).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field


class RetryReason(str, enum.Enum):
    """Why events are sent again; the ``reason`` label of ``forwarder_retries_total``."""

    THROTTLED = "throttled"  # 429, ThrottlingException, throttled entries: the quota is here
    PARTIAL = "partial"  # retryable failed entries of a 200 other than throttling
    SERVER_ERROR = "server_error"  # 5xx
    TIMEOUT = "timeout"  # no answer in time
    CONNECTION = "connection"  # unreachable, or the connection broke
    PROTOCOL = "protocol"  # an answer that does not confirm the batch (e.g. a proxy's HTML page)
    INTERNAL = "internal"  # our own failure while applying an outcome (e.g. the dead-letter file)

    @property
    def outage(self) -> bool:
        """The service is not answering: an outage, not a quota (the rate controller learns nothing)."""
        return self in _OUTAGE


_OUTAGE = frozenset({RetryReason.SERVER_ERROR, RetryReason.TIMEOUT, RetryReason.CONNECTION, RetryReason.PROTOCOL})

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


@dataclass(frozen=True, slots=True)
class CallResult:
    """What one PutProjectEvents call returned, reduced to what the policy needs."""

    status: int  # HTTP status; 0 when no usable answer came
    code: str = ""  # AWS error code of a whole-request failure
    message: str = ""
    retry_after: float | None = None  # seconds, from Retry-After / x-amz-retry-after
    # (index, errorCode, errorMessage) for the failed entries of a 200
    failed: tuple[tuple[int, str, str], ...] = field(default_factory=tuple)
    # Without a usable answer (status 0): why, and whether the request may have
    # reached the service (its body was sent), which makes a resend a possible duplicate.
    unanswered: RetryReason | None = None
    maybe_delivered: bool = False


def no_answer(reason: RetryReason, message: str, maybe_delivered: bool) -> CallResult:
    """A call that got no usable answer: timeout, broken connection, or an answer that confirms nothing."""
    return CallResult(0, reason.value, message, unanswered=reason, maybe_delivered=maybe_delivered)


@dataclass(frozen=True, slots=True)
class Done:
    """Every event acknowledged."""


@dataclass(frozen=True, slots=True)
class Retry:
    reason: RetryReason
    retry_after: float | None = None
    ambiguous: bool = False  # the service may have accepted the events


@dataclass(frozen=True, slots=True)
class Split:
    """The service refused the whole batch because of some of its events: bisect."""


@dataclass(frozen=True, slots=True)
class OpenCircuit:
    """The project cannot be written now (403, 404, credentials): stop and back off."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Nothing will make the service accept these events."""


@dataclass(frozen=True, slots=True)
class Partial:
    """A 200 with failed entries: resend some, dead-letter the rest."""

    retry: tuple[tuple[int, str, str], ...]  # (index, errorCode, errorMessage)
    dead: tuple[tuple[int, str, str], ...]
    throttled: int


Decision = Done | Retry | Split | OpenCircuit | DeadLetter | Partial


def classify(result: CallResult, batch_size: int) -> Decision:
    """Decide what happens to a batch after one call."""
    if result.unanswered is not None:
        return Retry(result.unanswered, ambiguous=result.maybe_delivered)
    if result.status == 200:
        if not result.failed:
            return Done()
        indexes = [i for i, _, _ in result.failed]
        if len(set(indexes)) != len(indexes) or not all(0 <= i < batch_size for i in indexes):
            # Results that do not match the batch confirm nothing (the client checks this too).
            return Retry(RetryReason.PROTOCOL, ambiguous=True)
        retry = tuple(f for f in result.failed if f[1] in RETRYABLE_ENTRY_CODES)
        dead = tuple(f for f in result.failed if f[1] not in RETRYABLE_ENTRY_CODES)
        throttled = sum(1 for _, code, _ in result.failed if code in THROTTLE_CODES)
        return Partial(retry, dead, throttled)
    if result.status == 429 or result.code in THROTTLE_CODES:
        return Retry(RetryReason.THROTTLED, result.retry_after)
    if result.status >= 500:
        # A 503 is refused at the door; a 500 may have failed after storing the events.
        refused = result.status == 503 or result.code == "ServiceUnavailableException"
        return Retry(RetryReason.SERVER_ERROR, result.retry_after, ambiguous=not refused)
    if result.code in CIRCUIT_CODES or result.status in (401, 403, 404):
        return OpenCircuit()
    if result.code in SPLIT_CODES or result.status in (400, 413):
        return Split() if batch_size > 1 else DeadLetter()
    if result.status == 408:
        return Retry(RetryReason.TIMEOUT, ambiguous=True)
    return DeadLetter()


def backoff(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform(0, min(maximum, initial * 2**attempt)); attempt counts from 0."""
    cap = min(maximum, initial * (2 ** min(attempt, 62)))
    return (rng or random).uniform(0.0, cap)


def retry_delay(attempt: int, initial: float, maximum: float, retry_after: float | None,
                rng: random.Random | None = None) -> float:
    """The service's Retry-After when it gave one (capped), else the jittered backoff."""
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, maximum)
    return backoff(attempt, initial, maximum, rng)


def circuit_delay(failures: int, initial: float, maximum: float) -> float:
    """How long a project's circuit stays open after ``failures`` consecutive refusals."""
    return min(maximum, max(initial, 1.0) * (2 ** min(failures - 1, 30)))


def probe_delay(probes: int, initial: float, maximum: float) -> float:
    """How long an endpoint in outage waits before its next probe: doubling, capped at ``maximum``.

    No jitter of its own: a probe is one call, and the cap is what bounds how late
    the end of an outage is noticed.
    """
    return min(maximum, initial * (2 ** min(probes, 30)))


def parse_retry_after(headers: dict[str, str]) -> float | None:
    """Seconds from ``x-amz-retry-after`` (milliseconds) or ``Retry-After`` (seconds)."""
    value = headers.get("x-amz-retry-after")
    try:
        if value is not None:
            return max(0.0, float(value) / 1000.0)
        value = headers.get("retry-after")
        if value is not None:
            return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date Retry-After: fall back to our own backoff
    return None
