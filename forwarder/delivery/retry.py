"""What one call returned (``CallResult``) and how long to wait before the next try.

Pure functions: ``backoff`` is capped exponential with full jitter; the circuit,
probe and dead-letter delays double up to their cap. What an answer *means* is
decided in one table, ``outcome.plan``. Exactly one layer retries: botocore's
own retries are off (see ``client.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from forwarder.observability import RetryReason

__all__ = ["CallResult", "RetryReason", "backoff", "circuit_delay", "dead_letter_delay", "no_answer", "parse_retry_after",
           "probe_delay", "retry_delay"]


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


def dead_letter_delay(failures: int, initial: float, maximum: float) -> float:
    """How long events wait before their dead-letter write is tried again after ``failures`` failed writes.

    Doubling, capped at ``maximum``: a full or broken disk does not heal in
    milliseconds, and each try costs a write and an error line.
    """
    return min(maximum, initial * (2 ** min(max(failures - 1, 0), 30)))


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
