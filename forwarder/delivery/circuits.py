"""Circuit breakers: per project (403/404, credentials) and for the whole endpoint (outage).

Both only decide; the sender defers, probes and reschedules. Time comes from an
injected clock, so every transition is testable without waiting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from forwarder.delivery.retry import circuit_delay, probe_delay
from forwarder.wakeup import EARLY, Wakeup

PROBE_WAIT = 0.25  # seconds a batch waits while its project's probe is in flight


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    code: str = ""  # the refusal that opened it, for the batches it holds back
    message: str = ""
    held: set[int] = field(default_factory=set)  # id() of the batches it is holding back
    since: float = 0.0  # when it first opened (this run of refusals)


class ProjectCircuits:
    """One breaker per project that the service refused (403, 404, credentials).

    Closed: batches go. Open: batches wait until ``open_until``. Then one batch
    goes as the probe while the others wait; its answer closes or reopens it.
    A circuit holding no batch any more is forgotten, so its gauge does not stay
    at 1 for a project that has nothing left to send.
    """

    def __init__(self, clock: Callable[[], float], on_change: Callable[[str, bool, str, float, str], None]) -> None:
        self._clock = clock
        self._on_change = on_change
        self._circuits: dict[str, _Circuit] = {}

    def hold(self, project: str, batch_id: int) -> tuple[float, str, str] | None:
        """None when the batch may go (possibly as the probe); else (due, code, message) to defer it."""
        circuit = self._circuits.get(project)
        if circuit is None:
            return None
        now = self._clock() + EARLY
        if circuit.open_until > now or circuit.probing:
            circuit.held.add(batch_id)
            due = circuit.open_until if circuit.open_until > now else now + PROBE_WAIT
            return due, circuit.code, circuit.message
        circuit.held.discard(batch_id)
        circuit.probing = True  # this batch is the probe
        return None

    def refused(self, project: str, batch_id: int, code: str, message: str, initial: float, maximum: float) -> float:
        """The service refused the project: open (or reopen) its circuit; returns when to try again."""
        circuit = self._circuits.get(project)
        if circuit is None:
            circuit = self._circuits[project] = _Circuit(since=self._clock())
        circuit.failures += 1
        circuit.probing = False
        circuit.code, circuit.message = code, message
        delay = circuit_delay(circuit.failures, initial, maximum)
        circuit.open_until = self._clock() + delay
        circuit.held.add(batch_id)
        self._on_change(project, True, code, delay, message)
        return circuit.open_until

    def answered(self, project: str) -> None:
        """The service answered a call for the project without refusing it: close its circuit."""
        if self._circuits.pop(project, None) is not None:
            self._on_change(project, False, "", 0.0, "")

    def probing(self, project: str) -> bool:
        """Whether a batch of the project is out as its circuit's probe."""
        circuit = self._circuits.get(project)
        return circuit is not None and circuit.probing

    def unanswered(self, project: str) -> None:
        """A probe got no answer about the project (an outage, or its call raised): the next batch probes."""
        circuit = self._circuits.get(project)
        if circuit is not None:
            circuit.probing = False

    def released(self, project: str, batch_id: int) -> None:
        """A batch the circuit held left for good (dead-lettered): forget the circuit once it holds none."""
        circuit = self._circuits.get(project)
        if circuit is None:
            return
        circuit.held.discard(batch_id)
        if not circuit.held and not circuit.probing:
            del self._circuits[project]
            self._on_change(project, False, "", 0.0, "")

    def state(self) -> dict[str, tuple[str, str, float, float, int]]:
        """Read-only, for /status: project -> (code, message, opened at, open until, batches held)."""
        return {p: (c.code, c.message, c.since, c.open_until, len(c.held)) for p, c in self._circuits.items()}

    def any_open(self) -> bool:
        now = self._clock()
        return any(c.open_until > now for c in self._circuits.values())


class Endpoint:
    """Health of the whole endpoint: up, or in an outage.

    Consecutive calls that got no answer from the service (5xx, timeouts, an
    unreachable endpoint, answers that confirm nothing) mean "the service is not
    answering", not "the quota is here": after ``threshold`` of them in a row the
    endpoint is in outage. Then one probe at a time goes out, each after a
    doubling wait capped at ``max_probe_interval`` (the cap bounds how late the
    end of an outage is noticed), and the first call the service answers ends
    it. The rate limiter learns nothing from any of this.
    """

    def __init__(self, threshold: int, initial: float, max_probe_interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = threshold
        self._initial = initial
        self._max_interval = max_probe_interval
        self._clock = clock
        self._failures = 0  # consecutive calls without an answer
        self.down_since: float | None = None
        self._probing = False
        self._probes = 0  # probes sent in this outage
        self._next_probe = 0.0
        self._changed = Wakeup()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def reconfigure(self, initial: float) -> None:
        """A new first probe delay (``retry.initial_backoff``), from the next probe on."""
        self._initial = initial

    def permit(self) -> float | bool:
        """False: go (no outage). True: go as the probe. A float: seconds to wait before asking again."""
        if self.down_since is None:
            return False
        if self._probing:
            return self._max_interval  # woken early when the probe's answer comes
        wait = self._next_probe - self._clock()
        if wait > EARLY:
            return wait
        self._probing = True
        self._probes += 1
        return True

    async def admit(self) -> bool:
        """Wait while in outage until this caller may probe; True when its call is the probe."""
        while True:
            decision = self.permit()
            if type(decision) is bool:
                return decision
            self._changed.clear()
            await self._changed.wait(decision)

    def answered(self) -> float | None:
        """The service answered a call; returns the outage's length if this ended one."""
        self._failures = 0
        self._probing = False
        since, self.down_since = self.down_since, None
        if since is None:
            return None
        self._changed.set()
        return self._clock() - since

    def failed(self, probe: bool) -> bool:
        """A call got no answer; True when this started an outage."""
        self._failures += 1
        now = self._clock()
        if self.down_since is not None:
            if probe:
                self._probing = False
                self._next_probe = now + probe_delay(self._probes, self._initial, self._max_interval)
                self._changed.set()
            return False
        if self._failures < self._threshold:
            return False
        self.down_since = now
        self._probes = 0
        self._next_probe = now + probe_delay(0, self._initial, self._max_interval)
        return True

    def release(self) -> None:
        """A probe permit that made no call (its batch expired or was held back): another may probe."""
        if self._probing:
            self._probing = False
            self._probes -= 1
            self._changed.set()

    @property
    def probes(self) -> int:
        return self._probes

    @property
    def probing(self) -> bool:
        """A probe is out: nobody else may probe until its answer is learned or its slot given back."""
        return self._probing
