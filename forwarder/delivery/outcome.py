"""From one call's decision to its effects on the batch: a pure plan the sender carries out.

Effects name batch positions, come in a fixed order (acknowledge, dead-letter,
then the in-memory reschedulings that cannot fail), and cover every event of the
batch exactly once, so a failure while applying one effect concerns only that
effect's events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from forwarder.delivery.retry import (CallResult, DeadLetter, Decision, Done, OpenCircuit, Partial, Retry, RetryReason, Split,
                    classify)


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


def plan(result: CallResult, size: int) -> Plan:
    """What happens to a batch of ``size`` events after one call answered ``result``."""
    return _plan(classify(result, size), result, size)


def _plan(decision: Decision, result: CallResult, size: int) -> Plan:
    everything = tuple(range(size))
    code = result.code or f"HTTP{result.status}"
    match decision:
        case Done():
            return Plan("ok", (Deliver(everything),), RateSignal.SUCCESS, True, 0, False)
        case Partial(retry=retry, dead=dead, throttled=throttled):
            return _partial(size, retry, dead, throttled)
        case Retry(reason=reason, retry_after=retry_after, ambiguous=ambiguous):
            throttled = reason is RetryReason.THROTTLED
            return Plan(reason.value, (Resend(everything, reason, retry_after, code, result.message),),
                        RateSignal.THROTTLE if throttled else RateSignal.NONE, not reason.outage,
                        int(throttled), ambiguous)
        case Split():
            half = size // 2
            return Plan("client_error", (Bisect((everything[:half], everything[half:])),), RateSignal.NONE,
                        True, 0, False)
        case OpenCircuit():
            return Plan("client_error", (Hold(everything, code, result.message),), RateSignal.NONE, True, 0, False)
        case DeadLetter():
            return Plan("client_error", (Reject(everything, code, result.message),), RateSignal.NONE, True, 0, False)
    raise AssertionError(f"unhandled decision {decision!r}")


def _partial(size: int, retry: tuple[tuple[int, str, str], ...], dead: tuple[tuple[int, str, str], ...],
             throttled: int) -> Plan:
    failed = {i for i, _, _ in retry} | {i for i, _, _ in dead}
    effects: list[Effect] = []
    ok = tuple(i for i in range(size) if i not in failed)
    if ok:
        effects.append(Deliver(ok))
    by_code: dict[tuple[str, str], list[int]] = {}
    for i, code, message in dead:
        by_code.setdefault((code, message), []).append(i)
    effects.extend(Reject(tuple(sorted(indexes)), code, message) for (code, message), indexes in by_code.items())
    if retry:
        _, code, message = retry[0]
        reason = RetryReason.THROTTLED if throttled else RetryReason.PARTIAL
        effects.append(Resend(tuple(sorted(i for i, _, _ in retry)), reason, None, code, message))
    # A 200 that took most of the batch says the request rate is fine: the
    # throttled entries are retried with backoff. Cutting the rate on every
    # partly throttled 200 drove it to the floor (docs/architecture.md, "Rate").
    rate = RateSignal.THROTTLE if throttled * 2 > size else RateSignal.SUCCESS
    return Plan("partial", tuple(effects), rate, True, throttled, False)
