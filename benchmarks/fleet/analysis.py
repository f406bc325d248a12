"""The fleet's figures from the emulator's counters (pure): windows, Jain's index, re-convergence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

EVENTS_PER_CALL = 50
SAMPLE_INTERVAL = 0.2  # seconds between two snapshots of the emulator's counters
WINDOW = 1.0  # seconds of the sliding window used for re-convergence
HOLD = 3.0  # seconds the window condition must keep holding to count as converged
BAND = (0.85, 1.10)  # accepted rate / quota that counts as "at the quota"
MAX_THROTTLED = 0.10  # throttled fraction under which the window counts as converged


@dataclass(frozen=True, slots=True)
class Sample:
    """The emulator's counters at monotonic time ``t`` (seconds since the run began)."""

    t: float
    accepted: dict[str, int]  # access key -> accepted events
    requests: dict[str, int]  # access key -> requests (throttled included)
    throttled: dict[str, int]  # access key -> throttled requests
    rates: dict[str, float] = field(default_factory=dict)  # access key -> limiter.rate


def jain(xs: Sequence[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 is fair, 1/n is one taker."""
    squares = sum(x * x for x in xs)
    if not xs or squares == 0:
        return 0.0
    return sum(xs) ** 2 / (len(xs) * squares)


def _total(counts: dict[str, int]) -> int:
    return sum(counts.values())


def _at(samples: Sequence[Sample], t: float) -> Sample:
    """The last sample taken at or before ``t`` (the first one if none)."""
    best = samples[0]
    for s in samples:
        if s.t > t:
            break
        best = s
    return best


@dataclass(frozen=True, slots=True)
class Window:
    """What the account saw between two samples."""

    seconds: float
    calls_per_s: float  # accepted requests per second (accepted events / 50)
    throttled: float  # fraction of the requests answered with a throttle
    per_key: dict[str, int]  # accepted events per access key


def window(a: Sample, b: Sample) -> Window:
    seconds = b.t - a.t
    accepted = _total(b.accepted) - _total(a.accepted)
    requests = _total(b.requests) - _total(a.requests)
    throttled = _total(b.throttled) - _total(a.throttled)
    per_key = {k: b.accepted.get(k, 0) - a.accepted.get(k, 0) for k in b.accepted.keys() | a.accepted.keys()}
    return Window(seconds, accepted / EVENTS_PER_CALL / seconds if seconds > 0 else 0.0,
                  throttled / requests if requests else 0.0, per_key)


def in_band(w: Window, quota: float) -> bool:
    low, high = BAND
    return low * quota <= w.calls_per_s <= high * quota


def reconvergence(samples: Sequence[Sample], changed_at: float, until: float, quota: float,
                  max_throttled: float | None = MAX_THROTTLED) -> float | None:
    """Seconds from a quota change to the end of the first WINDOW-long window such that

    * it and every WINDOW-long window ending in the next HOLD seconds carry an
      accepted rate within BAND of the new quota, and
    * the throttled fraction over that whole span (WINDOW + HOLD seconds) is
      below MAX_THROTTLED: one second holds too few calls (100 at Q=100, one
      call is 1%) to judge a fraction near 10% window by window.

    Only windows that start after the change count, so the figure is at least
    WINDOW. None: not within [changed_at, until). ``max_throttled=None`` drops
    the second condition: the rate alone is back at the new quota.
    """
    ends = [s for s in samples if changed_at + WINDOW <= s.t < until]
    ok = [in_band(window(_at(samples, s.t - WINDOW), s), quota) for s in ends]
    for i, s in enumerate(ends):
        if s.t + HOLD > until:
            return None  # too close to the end of the phase to show it holds
        held = [ok[j] for j in range(i, len(ends)) if ends[j].t <= s.t + HOLD]
        span = window(_at(samples, s.t - WINDOW), _at(samples, s.t + HOLD))
        if all(held) and (max_throttled is None or span.throttled < max_throttled):
            return s.t - changed_at
    return None


@dataclass(frozen=True, slots=True)
class Schedule:
    """When the quota changes, and the steady window measured before the first change."""

    quota: float
    duration: float
    warmup: float

    @property
    def halve_at(self) -> float:
        return self.duration / 2

    @property
    def double_at(self) -> float:
        return self.duration * 3 / 4

    def steps(self) -> list[tuple[float, float]]:
        return [(self.halve_at, self.quota / 2), (self.double_at, self.quota)]


@dataclass(slots=True)
class Result:
    controller: str
    forwarders: int
    quota: float
    duration: float
    goodput: float  # fraction of Q*50 events/s, steady window
    throttled: float  # fraction of requests, steady window
    jain: float  # per-forwarder accepted events, steady window
    reconverge_down: float | None  # seconds, after Q -> Q/2
    reconverge_up: float | None  # seconds, after Q/2 -> Q
    rate_down: float | None  # seconds until the accepted rate alone is back in BAND, after Q -> Q/2
    rate_up: float | None  # the same after Q/2 -> Q
    goodput_half: float  # fraction of (Q/2)*50 over the second half of the Q/2 phase
    goodput_back: float  # fraction of Q*50 over the second half of the last phase
    throttled_after: float  # throttled fraction from the halving to the end
    fleet_cpu: float  # cores used by this process (the forwarders) over the run
    emulator_cpu: float  # cores used by the emulator process over the run
    loop_lag_p99: float  # seconds the sampler woke late, 99th percentile
    feed_rejected: float  # fraction of fed events refused by full buffers (expected: offered > share)


def summarize(samples: Sequence[Sample], sched: Schedule, controller: str, forwarders: int,
              extra: dict[str, float]) -> Result:
    """Figures of one run from its samples; each is described in the package docstring (__init__.py)."""
    q = sched.quota
    steady = window(_at(samples, sched.warmup), _at(samples, sched.halve_at))
    half_mid = (sched.halve_at + sched.double_at) / 2
    half = window(_at(samples, half_mid), _at(samples, sched.double_at))
    back = window(_at(samples, (sched.double_at + sched.duration) / 2), samples[-1])
    after = window(_at(samples, sched.halve_at), samples[-1])
    per_key = [float(steady.per_key.get(f"fwd-{i}", 0)) for i in range(forwarders)]
    return Result(
        controller=controller, forwarders=forwarders, quota=q, duration=sched.duration,
        goodput=steady.calls_per_s / q,
        throttled=steady.throttled,
        jain=jain(per_key),
        reconverge_down=reconvergence(samples, sched.halve_at, sched.double_at, q / 2),
        reconverge_up=reconvergence(samples, sched.double_at, sched.duration, q),
        rate_down=reconvergence(samples, sched.halve_at, sched.double_at, q / 2, max_throttled=None),
        rate_up=reconvergence(samples, sched.double_at, sched.duration, q, max_throttled=None),
        goodput_half=half.calls_per_s / (q / 2),
        goodput_back=back.calls_per_s / q,
        throttled_after=after.throttled,
        **extra,
    )
