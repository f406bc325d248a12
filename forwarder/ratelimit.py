"""Adaptive client-side send rate: a paced token bucket whose rate follows a controller.

``evidently.rate_controller`` picks it:

* ``cubic`` (the default, botocore's adaptive mode uses the same constants):
  its growth is time-based and flattens out near the last throttled rate, so
  one forwarder alone on a quota rarely overshoots: 3-4% of calls throttled
  against a 10 calls/s quota (tests/test_e2e_delivery.py), where ``scaled``
  throttled 12.5%.
* ``scaled`` (``ScaledAimd``) for a fleet, e.g. one sidecar per pod: many
  forwarders that do not know each other share one account quota, and each
  learns only from its own throttled calls. Each adds, per second, 8% of a
  slow average of its own rate and cuts by 40% on a throttle. Because of that
  scale, a forwarder with a share of 1.5 calls/s climbs back as fast as one
  with 25, and the increase does not depend on max_rate, as ``Aimd``'s does.
  Because the average is slow, the increase is about the same for every
  forwarder of a fleet while throttles come in proportion to each one's rate,
  which pulls the shares together. Against CUBIC, measured with
  ``benchmarks/fleet.py``: 3.6% of calls throttled instead of 8.9% at 16
  forwarders on one quota, 16.5% instead of 25.1% at 64, with fairer shares
  (docs/scaling.md).
* ``aimd``: kept for comparison (``benchmarks/fleet.py --controller aimd``).

One decrease per round trip: throttles answering requests sent before the last
decrease say nothing new, so they are ignored (TCP's one reduction per window);
otherwise the in-flight requests of one congestion event would cut the rate
``concurrency`` times over. The same goes for requests booked before it that
went out just after, at the old pace (``STALE_BOOKING``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Protocol

MIN_RATE = 0.5  # requests/s; never stop probing entirely
MEASURE_INTERVAL = 0.5  # seconds per bucket of the measured send rate
STALE_BOOKING = 0.3  # seconds: a call booked before a decrease and sent within this of it is not news


class Controller(Protocol):
    def success(self, now: float) -> float: ...

    def throttle(self, rate: float, now: float) -> float: ...


class Cubic:
    """Rate after the last throttle: C*(t-K)^3 + W_max, and W_max*beta on throttle."""

    def __init__(self, initial_rate: float, now: float, scale: float = 0.4, beta: float = 0.7) -> None:
        self._scale = scale
        self._beta = beta
        # Start as if a throttle at initial/beta had just cut the rate to initial.
        self._w_max = initial_rate / beta
        self._k = self._zero_point()
        self._last_throttle = now

    def _zero_point(self) -> float:
        return (self._w_max * (1 - self._beta) / self._scale) ** (1 / 3)

    def success(self, now: float) -> float:
        return self._scale * (now - self._last_throttle - self._k) ** 3 + self._w_max

    def throttle(self, rate: float, now: float) -> float:
        self._w_max = rate
        self._k = self._zero_point()
        self._last_throttle = now
        return rate * self._beta


class Aimd:
    """Additive increase (requests/s per second), multiplicative decrease.

    Its increase is max_rate/100 per second, so it behaves well only with
    max_rate near the forwarder's share: at M=16 sharing 100 calls/s it throttled
    5.4% of calls with max_rate 100 and 19.6% with 1000 (CUBIC: 8.0% and 7.5%;
    docs/scaling.md)."""

    def __init__(self, initial_rate: float, now: float, increase: float = 1.0, beta: float = 0.7) -> None:
        self._rate = initial_rate
        self._increase = increase
        self._beta = beta
        self._last = now

    def success(self, now: float) -> float:
        self._rate += self._increase * max(0.0, now - self._last)
        self._last = now
        return self._rate

    def throttle(self, rate: float, now: float) -> float:
        self._rate = rate * self._beta
        self._last = now
        return self._rate


class ScaledAimd:
    """AIMD whose increase per second is ``growth`` x a slow average of its own rate.

    Scaled so that a forwarder with a share of 1.5 calls/s and one with 25
    both climb back about 8% of their rate per second (from half a quota back
    to 85% of it in about 9 s at any share; docs/scaling.md), which AIMD's
    fixed increase cannot do. The average is
    slow (``tau`` seconds) so that it is about the same for every forwarder of
    a fleet: the increase is then the same for all while the decreases, one
    per throttle (at most one per round trip), come in proportion to each
    one's rate, which pulls the rates together. With the forwarder's own last throttled rate as the scale, a
    larger forwarder would also grow faster, and nothing would pull the
    rates together.
    """

    def __init__(self, initial_rate: float, now: float, max_rate: float, growth: float = 0.08,
                 beta: float = 0.4, tau: float = 20.0) -> None:
        self._max_rate, self._growth, self._beta, self._tau = max_rate, growth, beta, tau
        self._rate = initial_rate
        self._average = initial_rate
        self._last = now

    def success(self, now: float) -> float:
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._average += min(1.0, elapsed / self._tau) * (self._rate - self._average)
        self._rate = min(self._max_rate, self._rate + self._growth * self._average * elapsed)
        return self._rate

    def throttle(self, rate: float, now: float) -> float:
        self._rate = rate * (1 - self._beta)
        self._last = now
        return self._rate


class RateLimiter:
    """Paces PutProjectEvents calls at an allowed rate that adapts to throttling."""

    def __init__(self, initial_rate: float, max_rate: float, controller: str = "cubic",
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[float, str], None] | None = None) -> None:
        self._clock = clock
        now = clock()
        self.max_rate = max_rate
        self.rate = max(MIN_RATE, min(initial_rate, max_rate))
        self._controller: Controller = make_controller(controller, self.rate, max_rate, now)
        self._tokens = 1.0
        self._refilled = now
        self._last_decrease = now
        self._on_change = on_change
        # measured send rate: requests per MEASURE_INTERVAL, smoothed
        self._bucket_start = now
        self._bucket_count = 0
        self.measured = 0.0

    def reconfigure(self, initial_rate: float, max_rate: float) -> None:
        self.max_rate = max_rate
        self.rate = max(MIN_RATE, min(self.rate, max_rate))

    async def acquire(self) -> float:
        """Wait for this call's turn; returns the time to pass to on_throttle."""
        booked = self._clock()
        self._refill(booked)
        self._tokens -= 1.0  # a reservation: a negative balance is a queue of waiters
        now = booked
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)
            now = self._clock()
        self._count(now)
        # A call booked before a decrease goes out at the old pace: its throttle
        # belongs to the episode that decrease answered. But at 1.5 calls/s a
        # booking can wait seconds, and a throttle that late is news.
        return max(booked, now - STALE_BOOKING)

    def _refill(self, now: float) -> None:
        capacity = max(1.0, self.rate / 20)  # at most 50 ms of burst: keep calls paced
        self._tokens = min(capacity, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now

    def _count(self, now: float) -> None:
        elapsed = now - self._bucket_start
        if elapsed >= MEASURE_INTERVAL:
            current = self._bucket_count / elapsed
            self.measured = current if self.measured == 0 else 0.8 * current + 0.2 * self.measured
            self._bucket_start, self._bucket_count = now, 0
        self._bucket_count += 1

    def on_success(self) -> None:
        now = self._clock()
        self._refill(now)
        rate = self._controller.success(now)
        # Do not grow far beyond what we actually send: an idle forwarder must
        # not wake up with a rate the account has never tolerated.
        ceiling = max(2 * self.measured, self.rate)
        self._set(min(rate, ceiling), "success")

    def on_throttle(self, sent_at: float) -> None:
        if sent_at < self._last_decrease:
            return  # sent before the last decrease: already accounted for
        now = self._clock()
        self._refill(now)
        self._last_decrease = now
        base = min(self.rate, self.measured) if self.measured else self.rate
        self._set(self._controller.throttle(base, now), "throttled")

    def _set(self, rate: float, reason: str) -> None:
        self.rate = max(MIN_RATE, min(self.max_rate, rate))
        if self._on_change is not None and reason == "throttled":
            self._on_change(self.rate, reason)


CONTROLLERS = ("cubic", "aimd", "scaled")


def make_controller(name: str, rate: float, max_rate: float, now: float) -> Controller:
    if name == "cubic":
        return Cubic(rate, now)
    if name == "aimd":
        return Aimd(rate, now, increase=max(1.0, max_rate / 100))
    if name == "scaled":
        return ScaledAimd(rate, now, max_rate)
    raise ValueError(f"rate controller must be one of {', '.join(CONTROLLERS)}, got {name!r}")
