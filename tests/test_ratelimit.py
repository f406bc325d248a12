from __future__ import annotations

import pytest

from forwarder.ratelimit import MIN_RATE, Aimd, Cubic, RateLimiter
from tests.fakes import FakeClock


def test_cubic_cuts_by_beta_and_climbs_back_to_the_last_throttled_rate():
    cubic = Cubic(10.0, now=0.0)
    assert cubic.throttle(100.0, now=0.0) == pytest.approx(70.0)
    k = (100.0 * 0.3 / 0.4) ** (1 / 3)
    assert cubic.success(now=0.0) == pytest.approx(70.0)
    assert cubic.success(now=k) == pytest.approx(100.0)  # plateau at W_max...
    assert cubic.success(now=k + 0.5) < 100.5  # ...where it probes gently
    assert cubic.success(now=k + 5) > 140.0  # and faster once past it


def test_aimd_adds_per_second_and_multiplies_down():
    aimd = Aimd(10.0, now=0.0, increase=2.0, beta=0.5)
    assert aimd.success(now=1.5) == pytest.approx(13.0)
    assert aimd.throttle(13.0, now=1.5) == pytest.approx(6.5)


def test_limiter_starts_at_initial_rate_and_never_exceeds_max_rate():
    clock = FakeClock(0.0)
    limiter = RateLimiter(100.0, 40.0, clock=clock)
    assert limiter.rate == 40.0
    for _ in range(100):
        clock.advance(1.0)
        limiter.on_success()
    assert limiter.rate == 40.0


def test_throttles_of_requests_sent_before_a_decrease_do_not_cut_the_rate_again():
    clock = FakeClock(0.0)
    limiter = RateLimiter(100.0, 1000.0, clock=clock)
    sent = [clock() for _ in range(4)]  # four calls in flight when the quota is hit
    clock.advance(0.01)
    for s in sent:
        limiter.on_throttle(s)
    assert limiter.rate == pytest.approx(70.0)
    clock.advance(0.01)
    limiter.on_throttle(clock())  # a call sent after the decrease is news
    assert limiter.rate == pytest.approx(49.0)


def test_rate_does_not_grow_far_beyond_what_is_actually_sent():
    clock = FakeClock(0.0)
    limiter = RateLimiter(10.0, 1000.0, clock=clock)
    for _ in range(60):  # a minute of successes with hardly any traffic
        clock.advance(1.0)
        limiter.on_success()
    assert limiter.rate == pytest.approx(10.0)


def test_rate_has_a_floor_so_probing_never_stops():
    clock = FakeClock(0.0)
    limiter = RateLimiter(1.0, 1000.0, clock=clock)
    for _ in range(20):
        clock.advance(1.0)
        limiter.on_throttle(clock())
    assert limiter.rate == MIN_RATE


async def test_acquire_paces_calls_at_the_allowed_rate():
    import time
    limiter = RateLimiter(200.0, 200.0)
    start = time.monotonic()
    for _ in range(21):
        await limiter.acquire()
    # 20 intervals of 5 ms after the first token: paced, not a burst
    assert time.monotonic() - start >= 20 / 200.0 * 0.9
