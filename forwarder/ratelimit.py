"""Adaptive client-side send rate: a paced token bucket whose rate follows CUBIC.

Why CUBIC (botocore's adaptive mode uses the same constants): its growth is
time-based, not per-response, so forwarders with different latencies converge to
the same share of one account quota, and it flattens out near the last rate that
was throttled, which keeps throttled requests rare. It does not depend on
max_rate, which AIMD's step does (see ``Aimd``); in the fleet simulation both used
0.97-1.0 of the quota. ``benchmarks/fleet.py --controller aimd`` compares them.

One decrease per round trip: throttles answering requests sent before the last
decrease say nothing new, so they are ignored (TCP's one reduction per window);
otherwise the in-flight requests of one congestion event would cut the rate
``concurrency`` times over.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Protocol

MIN_RATE = 0.5  # requests/s; never stop probing entirely
MEASURE_INTERVAL = 0.5  # seconds per bucket of the measured send rate


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


class RateLimiter:
    """Paces PutProjectEvents calls at an allowed rate that adapts to throttling."""

    def __init__(self, initial_rate: float, max_rate: float, controller: str = "cubic",
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[float, str], None] | None = None) -> None:
        self._clock = clock
        now = clock()
        self.max_rate = max_rate
        self.rate = max(MIN_RATE, min(initial_rate, max_rate))
        self._controller: Controller = (Cubic(self.rate, now) if controller == "cubic"
                                        else Aimd(self.rate, now, increase=max(1.0, max_rate / 100)))
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
        """Wait for this call's turn; returns the send time to pass to on_throttle."""
        now = self._clock()
        self._refill(now)
        self._tokens -= 1.0  # a reservation: a negative balance is a queue of waiters
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)
            now = self._clock()
        self._count(now)
        return now

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
