"""A batch: the events of one project bound for one PutProjectEvents call, and their history.

Like aiokafka's ``MessageBatch``, a batch owns its state: each event travels with
its place in the buffer (the lease and position that acknowledge it), and what
happens to the batch (attempts, answers, deferrals, a dead-letter write still to
do) is recorded by its own methods. The batcher, the sender and the effects call
them; nobody else assigns its fields.
"""

from __future__ import annotations

import enum
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import chain

from forwarder.buffer.contract import Lease, Receipt
from forwarder.delivery.outcome import Plan
from forwarder.delivery.retry import CallResult
from forwarder.observability import RetryReason


class FlushReason(str, enum.Enum):
    SIZE = "size"
    DEADLINE = "deadline"
    DRAIN = "drain"


class Batch:
    """Events of one project, each with its receipt, and everything that happened to them."""

    __slots__ = ("_project", "_received_at", "_runs", "_size", "_flush_reason", "_attempts", "_first_attempt_at",
                 "_last_attempt_at", "_last_code", "_last_message", "_last_reason", "_maybe_stored",
                 "_rejection", "_write_failures")

    def __init__(self, project: str, received_at: float) -> None:
        self._project = project
        self._received_at = received_at  # wall clock of the oldest event
        # Runs of events read under one lease, the run's first at position ``first``:
        # each event travels with what acknowledges it (its lease and position).
        self._runs: list[tuple[Lease, int, list[bytes]]] = []
        self._size = 0
        self._flush_reason = FlushReason.SIZE
        self._attempts = 0
        self._first_attempt_at = 0.0  # wall clock; 0 until the first attempt (or deferral)
        self._last_attempt_at = 0.0
        self._last_code = ""
        self._last_message = ""
        self._last_reason: RetryReason | None = None  # why it was last rescheduled
        self._maybe_stored = False  # an attempt may have stored these events without confirming it
        self._rejection: tuple[str, str] | None = None  # (code, message) of a dead-letter write still to do
        self._write_failures = 0  # failed dead-letter writes in a row

    # filling (the batcher)

    def fill(self, events: Sequence[bytes], lease: Lease, first: int) -> None:
        """Add events read under ``lease``, the first at position ``first``."""
        runs = self._runs
        if runs and runs[-1][0] is lease and runs[-1][1] + len(runs[-1][2]) == first:
            runs[-1][2].extend(events)
        else:
            runs.append((lease, first, list(events)))
        self._size += len(events)

    def seal(self, reason: FlushReason) -> None:
        self._flush_reason = reason

    # reading

    def __len__(self) -> int:
        return self._size

    @property
    def project(self) -> str:
        return self._project

    @property
    def received_at(self) -> float:
        """Wall clock of its oldest event."""
        return self._received_at

    @property
    def events(self) -> list[bytes]:
        """The events, in order, as the call carries them."""
        runs = self._runs
        return list(runs[0][2]) if len(runs) == 1 else list(chain.from_iterable(events for _, _, events in runs))

    def event_id(self, i: int) -> str | None:
        """The eventId the intake answered for its ``i``-th event (None when the buffer did not say)."""
        i = i + self._size if i < 0 else i
        for lease, first, events in self._runs:
            if i < len(events):
                return lease.event_id(first + i)
            i -= len(events)
        raise IndexError("batch index out of range")

    def receipt(self) -> Receipt:
        """What acknowledges these events to the buffer."""
        return Receipt([(lease, first, first + len(events)) for lease, first, events in self._runs])

    @property
    def flush_reason(self) -> FlushReason:
        return self._flush_reason

    @property
    def attempts(self) -> int:
        return self._attempts

    @property
    def first_attempt_at(self) -> float:
        return self._first_attempt_at

    @property
    def last_attempt_at(self) -> float:
        return self._last_attempt_at

    @property
    def last_error(self) -> tuple[str, str]:
        """(code, message) of the last failure it met, empty strings if none."""
        return self._last_code, self._last_message

    @property
    def rejection(self) -> tuple[str, str] | None:
        """(code, message) of a dead-letter write that failed and is still to do: no call, only the write."""
        return self._rejection

    @property
    def outage_retry(self) -> bool:
        """Rescheduled because the service did not answer: due again as soon as an outage ends."""
        return self._last_reason is not None and self._last_reason.outage

    def expired(self, wall: float, max_elapsed: float) -> bool:
        """Past retry.max_elapsed since its first attempt (or first deferral)."""
        return bool(self._first_attempt_at) and wall >= self._first_attempt_at + max_elapsed

    # its history

    def attempt(self, wall: float) -> None:
        """A call for these events starts now."""
        self._attempts += 1
        self._first_attempt_at = self._first_attempt_at or wall
        self._last_attempt_at = wall

    def result(self, result: CallResult, outcome: Plan) -> int:
        """The call's answer; returns how many events it may have stored a second time.

        Every copy the service may have stored after an earlier one that may have
        been stored too counts: a third copy after two timeouts counts again.
        """
        self._last_code, self._last_message = result.code, result.message
        duplicates = outcome.stored(len(self)) if self._maybe_stored else 0
        self._maybe_stored = self._maybe_stored or outcome.ambiguous
        return duplicates

    def retrying(self, reason: RetryReason, code: str, message: str) -> None:
        """To be sent again for ``reason``."""
        self._last_reason = reason
        self._last_code, self._last_message = code, message

    def held(self, wall: float, code: str, message: str) -> None:
        """Deferred by its project's open circuit, without a call."""
        # The deadline runs from the first deferral too: a project that never
        # heals must not keep its events forever. Should it expire while held
        # back, its dead letter says why the project refused.
        self._first_attempt_at = self._first_attempt_at or wall
        self._last_code, self._last_message = code, message

    def rejected(self, code: str, message: str) -> int:
        """Its dead-letter write failed: the write is still to do; returns the failed writes in a row."""
        self._rejection = (code, message)
        self._last_reason = RetryReason.INTERNAL
        self._write_failures += 1
        return self._write_failures

    def part(self, indexes: Iterable[int]) -> Batch:
        """This batch if ``indexes`` name all its events, else a subset with the same history."""
        indexes = tuple(indexes)
        return self if len(indexes) == len(self) else self.subset(indexes)

    def subset(self, indexes: Iterable[int]) -> Batch:
        """The same history for some of the events (a split or a partial resend), in the order given."""
        other = Batch(self._project, self._received_at)
        for name in Batch.__slots__[4:]:
            setattr(other, name, getattr(self, name))
        for lease, position, event in self._located(indexes):
            other.fill((event,), lease, position)
        return other

    def _located(self, indexes: Iterable[int]) -> Iterable[tuple[Lease, int, bytes]]:
        """(lease, position, event) of the events at ``indexes``."""
        starts: list[int] = []  # the batch index of each run's first event
        offset = 0
        for _, _, events in self._runs:
            starts.append(offset)
            offset += len(events)
        for i in indexes:
            if not 0 <= i < offset:
                raise IndexError(f"index {i} is beyond the batch's {offset} events")
            r = bisect_right(starts, i) - 1
            lease, first, events = self._runs[r]
            yield lease, first + i - starts[r], events[i - starts[r]]
