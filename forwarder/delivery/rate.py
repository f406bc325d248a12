"""Adaptive client-side send rate: a paced token bucket whose rate follows a controller.

Two phases, like TCP's. Slow start: from ``initial_rate`` the rate doubles every
``SLOW_START_INTERVAL`` while calls are waiting for it, until the first throttle
or ``max_rate``; a backlog after a restart or an outage drains at the quota in
about a second instead of a controller's slow climb. It starts again after an
idle period. Then the controller (``evidently.rate_controller``) owns the rate:

* ``cubic`` (the default, botocore's adaptive mode uses the same constants):
  time-based growth that flattens out near the last throttled rate, so one
  forwarder alone on a quota rarely overshoots.
* ``scaled`` (``ScaledAimd``) for a fleet of forwarders sharing one account
  quota (one sidecar per pod): each adds per second a share of a slow average
  of its own rate and cuts by 40% on a throttle, which pulls the shares
  together.

Benchmarks build their own controllers (``Controller``) and pass them in; the
configuration accepts only ``SHIPPED_CONTROLLERS`` unless told otherwise.

Only throttling teaches the rate anything, and two kinds say different things:

* A whole request throttled (429, ``ThrottlingException``) is a loss: the call
  did not go through, the quota is here. The controller cuts hard (``throttle``).
  One decrease per round trip: throttles answering requests sent before the
  last decrease say nothing new (TCP's one reduction per window), nor do
  requests booked before it that went out just after, at the old pace
  (``STALE_BOOKING``).
* Throttled entries inside a 200 are marks, as ECN marks are to DCTCP: the call
  went through, a few of its events did not. ``alpha`` is a moving average
  (gain ``MARK_GAIN`` per window) of the fraction of entries throttled, and
  once per ``MARK_WINDOW`` with marks the rate is cut by ``alpha / 2``
  (``Controller.ease``) while the controller's growth carries on. A constant
  1% of throttled entries then costs about 0.5% of the rate per second, which
  the growth wins back, where a hard cut per mark drove the rate under the
  load (issue 25). Slow start learns ``alpha`` but is not ended by marks: it
  lasts about a second and ends at a whole-request throttle or ``max_rate``.

5xx, timeouts and an unreachable endpoint are an outage (``circuits.Endpoint``),
not a quota. The figures behind each choice are in docs/architecture.md
("Rate") and docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import time
from types import MappingProxyType
from typing import Callable, Mapping, Protocol

from forwarder.config import MIN_RATE, RATE_CONTROLLERS, EvidentlyConfig
MEASURE_INTERVAL = 0.5  # seconds per bucket of the measured send rate
STALE_BOOKING = 0.3  # seconds: a call booked before a decrease and sent within this of it is not news
# Slow start doubles the rate this often while calls wait for it: from a tenth of
# the quota to all of it in under a second (benchmarks/RESULTS.md, "backlog drain").
SLOW_START_INTERVAL = 0.25
IDLE_RESTART = 10.0  # seconds without a call after which the next burst starts slow again
# Per-event throttles (marks) cut the rate at most once per window, by alpha/2;
# alpha moves by MARK_GAIN of the way to each window's throttled fraction (DCTCP's g).
MARK_WINDOW = 1.0  # seconds
MARK_GAIN = 1 / 16


class Controller(Protocol):
    def success(self, now: float) -> float: ...

    def throttle(self, rate: float, now: float) -> float: ...

    def resume(self, rate: float, now: float) -> None:
        """Take over at ``rate`` after slow start, keeping what was learnt before it."""

    def ease(self, rate: float, factor: float, now: float) -> float:
        """A gentle cut (per-event throttles): ``rate * factor``, the growth carrying on from there."""


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

    def resume(self, rate: float, now: float) -> None:
        # As at the start: on the curve's plateau at ``rate``, growing past it gently.
        self._w_max = rate / self._beta
        self._k = self._zero_point()
        self._last_throttle = now

    def ease(self, rate: float, factor: float, now: float) -> float:
        # The whole curve moves down by the cut, its epoch stays: restarting the
        # epoch at every small cut would keep CUBIC on its plateau, sinking.
        self._w_max -= rate * (1 - factor)
        return rate * factor


class ScaledAimd:
    """AIMD whose increase per second is ``growth`` x a slow average of its own rate.

    Scaled so that a forwarder with a small share and one with a large share
    both climb back the same fraction of their rate per second, which AIMD's
    fixed increase cannot do. The average is slow (``tau`` seconds) so that it
    is about the same for every forwarder of a fleet: the increase is then the
    same for all while the decreases, one per throttle, come in proportion to
    each one's rate, which pulls the rates together (docs/scaling.md).
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

    def resume(self, rate: float, now: float) -> None:
        # The slow average keeps its value from before slow start: a fleet whose
        # members all doubled up to max_rate in the first second (the quota's
        # burst hides the overshoot for that long) must not grow by a share of
        # max_rate for the next minute (docs/scaling.md, slow start).
        self._rate, self._last = rate, now

    def ease(self, rate: float, factor: float, now: float) -> float:
        self._rate = rate * factor  # the slow average, and so the growth, carry on
        return self._rate


class RateLimiter:
    """Paces PutProjectEvents calls at an allowed rate that adapts to throttling."""

    def __init__(self, initial_rate: float, max_rate: float, controller: ControllerFactory | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[float, str], None] | None = None) -> None:
        self._clock = clock
        self._make_controller = controller or SHIPPED_CONTROLLERS["cubic"]
        self._on_change = on_change
        self._tokens = 1.0
        now = clock()
        self._refilled = self._last_decrease = self._last_call = now
        # measured send rate: requests per MEASURE_INTERVAL, smoothed
        self._bucket_start = now
        self._bucket_count = 0
        self.measured = 0.0
        self._restart(initial_rate, max_rate, now)

    def _restart(self, initial_rate: float, max_rate: float, now: float) -> None:
        self.initial_rate, self.max_rate = initial_rate, max_rate
        self.rate = max(MIN_RATE, min(initial_rate, max_rate))
        self._controller: Controller = self._make_controller(self.rate, max_rate, now)
        self.alpha = 0.0  # moving average of the fraction of entries throttled inside 200s
        self._open_window(now)
        self._enter_slow_start(now)

    def _open_window(self, now: float) -> None:
        self._window_start = now
        self._window_entries = self._window_marks = 0

    def _enter_slow_start(self, now: float) -> None:
        self.slow_start = self.rate < self.max_rate
        self._grown_at = now
        self._waited = False  # a call waited for its turn since the last doubling

    @property
    def controller(self) -> Controller:
        """The controller that owns the rate after slow start."""
        return self._controller

    LIVE_KEYS = ("evidently.initial_rate", "evidently.max_rate")

    async def reconfigure(self, evidently: EvidentlyConfig) -> None:
        """New rates (reload): a change starts over from the initial rate in slow start; none changes nothing."""
        initial_rate, max_rate = evidently.effective_initial_rate, evidently.effective_max_rate
        if (initial_rate, max_rate) != (self.initial_rate, self.max_rate):
            self._restart(initial_rate, max_rate, self._clock())

    async def acquire(self) -> float:
        """Wait for this call's turn; returns the time to pass to on_throttle."""
        booked = self._clock()
        if booked - self._last_call > IDLE_RESTART and not self.slow_start:
            self.rate = max(self.rate, min(self.initial_rate, self.max_rate))
            self._enter_slow_start(booked)
        self._last_call = booked
        self._refill(booked)
        self._tokens -= 1.0  # a reservation: a negative balance is a queue of waiters
        now = booked
        if self._tokens < 0:
            self._waited = True
            await asyncio.sleep(-self._tokens / self.rate)
            now = self._clock()
        self._count(now)
        # A call booked before a decrease goes out at the old pace: its throttle
        # belongs to the episode that decrease answered. But at 1.5 calls/s a
        # booking can wait seconds, and a throttle that late is news.
        return max(booked, now - STALE_BOOKING)

    def _refill(self, now: float) -> None:
        capacity = max(1.0, self.rate / 20)  # at most 1/20 s of burst: keep calls paced
        self._tokens = min(capacity, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now

    def _count(self, now: float) -> None:
        elapsed = now - self._bucket_start
        if elapsed >= MEASURE_INTERVAL:
            current = self._bucket_count / elapsed
            self.measured = current if self.measured == 0 else 0.8 * current + 0.2 * self.measured
            self._bucket_start, self._bucket_count = now, 0
        self._bucket_count += 1

    def on_success(self, entries: int = 0, throttled: int = 0) -> None:
        """The service took a call (a 200) of ``entries`` events, ``throttled`` of which it throttled."""
        now = self._clock()
        self._refill(now)
        if self.slow_start:
            self._grow(now)
        else:
            rate = self._controller.success(now)
            # Do not grow far beyond what we actually send: an idle forwarder must
            # not wake up with a rate the account has never tolerated.
            ceiling = max(2 * self.measured, self.rate)
            self._set(min(rate, ceiling), "success")
        self._mark(entries, throttled, now)

    def _mark(self, entries: int, throttled: int, now: float) -> None:
        """DCTCP's rule: alpha follows each window's throttled fraction; a window with marks cuts alpha/2."""
        self._window_entries += entries
        self._window_marks += throttled
        if now - self._window_start < MARK_WINDOW or not self._window_entries:
            return
        self.alpha += MARK_GAIN * (self._window_marks / self._window_entries - self.alpha)
        if self._window_marks and not self.slow_start:
            self._set(self._controller.ease(self.rate, 1 - self.alpha / 2, now), "marked")
        self._open_window(now)

    def _grow(self, now: float) -> None:
        if now - self._grown_at < SLOW_START_INTERVAL:
            return
        if self._waited:  # double only a rate that is what holds the calls back
            self._set(self.rate * 2, "success")
        self._grown_at, self._waited = now, False
        if self.rate >= self.max_rate:
            self._leave_slow_start(now)

    def _leave_slow_start(self, now: float) -> None:
        self.slow_start = False
        self._controller.resume(self.rate, now)

    def on_throttle(self, sent_at: float) -> None:
        if sent_at < self._last_decrease:
            return  # sent before the last decrease: already accounted for
        now = self._clock()
        self._refill(now)
        self._last_decrease = now
        if self.slow_start:
            self._leave_slow_start(now)
        base = min(self.rate, self.measured) if self.measured else self.rate
        self._set(self._controller.throttle(base, now), "throttled")
        # Marks of the calls before this cut are answered by it: the next gentle
        # cut is a window away at the earliest.
        self._open_window(now)

    def _set(self, rate: float, reason: str) -> None:
        self.rate = max(MIN_RATE, min(self.max_rate, rate))
        if self._on_change is not None and reason == "throttled":
            self._on_change(self.rate, reason)


# A controller for a limiter: factory(initial_rate, max_rate, now).
ControllerFactory = Callable[[float, float, float], Controller]

# The controllers evidently.rate_controller names in production, in the order
# the configuration's error lists them. Read-only: the composition root picks
# from it, and a benchmark passes its own mapping instead of adding to this one.
SHIPPED_CONTROLLERS: Mapping[str, ControllerFactory] = MappingProxyType({
    "cubic": lambda rate, max_rate, now: Cubic(rate, now),
    "scaled": lambda rate, max_rate, now: ScaledAimd(rate, now, max_rate),
})
