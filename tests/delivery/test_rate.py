from __future__ import annotations

import asyncio

import pytest

from forwarder.config import ConfigError, EvidentlyConfig, from_dict
from forwarder.delivery.rate import SHIPPED_CONTROLLERS, MIN_RATE, Cubic, RateLimiter, ScaledAimd
from tests.fakes import FakeClock


def test_cubic_cuts_by_beta_and_climbs_back_to_the_last_throttled_rate():
    cubic = Cubic(10.0, now=0.0)
    assert cubic.throttle(100.0, now=0.0) == pytest.approx(70.0)
    k = (100.0 * 0.3 / 0.4) ** (1 / 3)
    assert cubic.success(now=0.0) == pytest.approx(70.0)
    assert cubic.success(now=k) == pytest.approx(100.0)  # plateau at W_max...
    assert cubic.success(now=k + 0.5) < 100.5  # ...where it probes gently
    assert cubic.success(now=k + 5) > 140.0  # and faster once past it


def climb(controller: ScaledAimd, start: float, seconds: float, step: float = 0.1) -> list[float]:
    """The controller's rate after each answer, one answer every ``step`` seconds."""
    return [controller.success(now=start + step * (i + 1)) for i in range(round(seconds / step))]


def test_scaled_aimd_cuts_by_beta():
    scaled = ScaledAimd(10.0, now=0.0, max_rate=100.0, beta=0.45)
    assert scaled.throttle(20.0, now=1.0) == pytest.approx(11.0)


@pytest.mark.parametrize("share", [1.5, 6.25, 25.0])
def test_scaled_aimd_climbs_back_from_a_cut_within_10_s_whatever_the_share(share):
    scaled = ScaledAimd(share, now=0.0, max_rate=1000.0)  # its average starts at the share
    scaled.throttle(share, now=0.0)
    rates = climb(scaled, 0.0, 10.0)
    assert rates[0] < 0.65 * share  # cut by beta = 0.4
    back = next(i for i, r in enumerate(rates) if r >= share) * 0.1
    assert 5.0 <= back <= 10.0  # the same few seconds at 1.5 calls/s as at 25


def test_scaled_aimd_grows_two_forwarders_of_one_fleet_by_the_same_calls_per_second():
    # Both sent 10 calls/s for a minute; one was just cut. The increase comes from the
    # slow average, not the current rate, so the cut one catches up (AIMD's fairness).
    ahead = ScaledAimd(10.0, now=0.0, max_rate=100.0, growth=0.1, beta=0.5)
    behind = ScaledAimd(10.0, now=0.0, max_rate=100.0, growth=0.1, beta=0.5)
    climb(ahead, 0.0, 1.0)
    climb(behind, 0.0, 1.0)
    ahead.throttle(10.0, now=1.0)
    behind.throttle(5.0, now=1.0)
    a, b = climb(ahead, 1.0, 2.0), climb(behind, 1.0, 2.0)
    assert a[-1] - 5.0 == pytest.approx(b[-1] - 2.5, rel=0.1)  # about 0.1 x 10 calls/s per second each
    assert b[-1] / a[-1] > 2.5 / 5.0


def test_scaled_aimd_never_grows_past_max_rate():
    scaled = ScaledAimd(10.0, now=0.0, max_rate=40.0)
    assert max(climb(scaled, 0.0, 120.0, step=1.0)) == 40.0


def test_unknown_controller_names_the_shipped_choices():
    with pytest.raises(ConfigError, match="evidently.rate_controller must be one of 'cubic', 'scaled', got 'bbr'"):
        from_dict({"evidently": {"rate_controller": "bbr"}}, {})


@pytest.mark.parametrize("controller", list(SHIPPED_CONTROLLERS))
def test_every_controller_cuts_once_for_the_calls_in_flight_and_stays_within_bounds(controller):
    clock = FakeClock(0.0)
    limiter = RateLimiter(100.0, 100.0, SHIPPED_CONTROLLERS[controller], clock=clock)
    sent = [clock() for _ in range(4)]
    clock.advance(0.01)
    for s in sent:
        limiter.on_throttle(s)
    once = limiter.rate
    assert 0.4 * 100.0 <= once <= 0.8 * 100.0
    for _ in range(30):
        clock.advance(0.01)
        limiter.on_throttle(clock())
    assert limiter.rate == MIN_RATE


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
    assert limiter.rate == pytest.approx(70.0)  # CUBIC, the default: beta 0.7
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


@pytest.mark.parametrize(("rate", "cuts_again"), [(10.0, False), (1.0, True)])
async def test_throttle_of_a_call_booked_before_a_decrease_is_news_only_if_it_waited_long(virtual_time, rate,
                                                                                          cuts_again):
    # At 10 calls/s the second call waits 0.1 s: it goes out at the old pace, part of the
    # episode already answered. At 1 call/s it waits 1 s, and a throttle that late is news.
    limiter = RateLimiter(rate, 100.0, SHIPPED_CONTROLLERS["scaled"], clock=virtual_time.time)
    first = await limiter.acquire()
    # the first call's throttle arrives while the second waits for its turn
    asyncio.get_running_loop().call_later(0.05, limiter.on_throttle, first)
    second = await limiter.acquire()
    after_first = limiter.rate
    assert after_first == pytest.approx(max(MIN_RATE, rate * 0.6))
    limiter.on_throttle(second)
    assert (limiter.rate < after_first) is cuts_again


async def test_acquire_paces_calls_at_the_allowed_rate(virtual_time):
    limiter = RateLimiter(200.0, 200.0, clock=virtual_time.time)
    times = []
    for _ in range(21):
        await limiter.acquire()
        times.append(virtual_time.time())
    # one call every 5 ms after the first token: paced, not a burst
    assert [round(b - a, 6) for a, b in zip(times, times[1:])] == [0.005] * 20


class Quota:
    """The account's quota as the service applies it: a token bucket of one second's worth."""

    def __init__(self, rate: float, clock) -> None:
        self.rate, self.clock = rate, clock
        self.tokens, self.last = rate, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


async def drain(limiter: RateLimiter, vt, seconds: float, quota: float | None = None) -> tuple[list[float], list[bool]]:
    """Calls as fast as the limiter allows for ``seconds``, answered at once against ``quota``:
    the rate at the end of each second, and per call whether it was throttled after the first 2 s."""
    bucket = Quota(quota, vt.time) if quota else None
    start = vt.time()
    rates, throttled, next_mark = [], [], start + 1.0
    while vt.time() < start + seconds:
        sent_at = await limiter.acquire()
        if bucket is not None and not bucket.take():
            limiter.on_throttle(sent_at)
            if vt.time() >= start + 2.0:
                throttled.append(True)
        else:
            limiter.on_success()
            if vt.time() >= start + 2.0:
                throttled.append(False)
        if vt.time() >= next_mark:
            rates.append(limiter.rate)
            next_mark += 1.0
    return rates, throttled


async def test_a_backlog_reaches_max_rate_within_a_second_by_slow_start(virtual_time):
    limiter = RateLimiter(20.0, 200.0, clock=virtual_time.time)
    rates, _ = await drain(limiter, virtual_time, 3.0)
    assert rates[0] == 200.0 and not limiter.slow_start  # 20 -> 40 -> 80 -> 160 -> 200, 0.25 s apart


@pytest.mark.parametrize("controller", ["cubic", "scaled"])
async def test_slow_start_finds_a_quota_below_max_rate_and_the_controller_stays_near_it(virtual_time, controller):
    limiter = RateLimiter(100.0, 1000.0, SHIPPED_CONTROLLERS[controller], clock=virtual_time.time)
    rates, throttled = await drain(limiter, virtual_time, 20.0, quota=200.0)
    assert not limiter.slow_start
    assert all(100.0 <= r <= 300.0 for r in rates[2:]), rates
    assert sum(throttled) / len(throttled) <= 0.10


def test_slow_start_does_not_double_a_rate_no_call_is_waiting_for():
    clock = FakeClock(0.0)
    limiter = RateLimiter(20.0, 200.0, clock=clock)
    for _ in range(40):  # answers keep coming, but nothing queues behind the limiter
        clock.advance(0.3)
        limiter.on_success()
    assert limiter.rate == 20.0


async def test_after_an_idle_period_the_next_burst_starts_fast_again(virtual_time):
    limiter = RateLimiter(20.0, 200.0, clock=virtual_time.time)
    await drain(limiter, virtual_time, 2.0, quota=100.0)
    assert not limiter.slow_start
    await asyncio.sleep(60.0)  # idle
    await limiter.acquire()
    assert limiter.slow_start


async def test_reloading_the_rates_starts_over_from_initial_rate_and_unchanged_rates_change_nothing():
    clock = FakeClock(0.0)
    limiter = RateLimiter(50.0, 100.0, SHIPPED_CONTROLLERS["scaled"], clock=clock)
    await limiter.reconfigure(EvidentlyConfig(initial_rate=0.5, max_rate=0.5))  # lowered...
    assert limiter.rate == 0.5
    await limiter.reconfigure(EvidentlyConfig(initial_rate=30.0, max_rate=300.0))  # ...and raised again
    assert (limiter.rate, limiter.max_rate, limiter.slow_start) == (30.0, 300.0, True)
    limiter.on_throttle(clock())
    rate = limiter.rate
    await limiter.reconfigure(EvidentlyConfig(initial_rate=30.0, max_rate=300.0))  # other keys changed
    assert limiter.rate == rate


async def test_the_scaled_controller_grows_up_to_a_raised_max_rate():
    clock = FakeClock(0.0)
    limiter = RateLimiter(10.0, 10.0, SHIPPED_CONTROLLERS["scaled"], clock=clock)
    await limiter.reconfigure(EvidentlyConfig(initial_rate=10.0, max_rate=100.0))
    limiter.on_throttle(clock())  # out of slow start, into the controller
    limiter.measured = 1000.0  # calls are queued: growth is not capped by what is sent
    for _ in range(600):
        clock.advance(0.1)
        limiter.on_success()
    assert limiter.rate == 100.0


@pytest.mark.parametrize(("name", "kind"), [("cubic", Cubic), ("scaled", ScaledAimd)])
def test_the_forwarder_paces_with_the_configured_controller(tmp_path, name, kind):
    from prometheus_client import CollectorRegistry

    from forwarder.app import Forwarder
    from forwarder.config import from_dict

    config = from_dict({"evidently": {"rate_controller": name},
                        "dead_letter": {"path": str(tmp_path / "dl.ndjson")}}, {})
    fwd = Forwarder(config, registry=CollectorRegistry(), process_metrics=False)
    assert type(fwd.limiter.controller) is kind


class Halving:
    """A controller that halves on a throttle and never grows."""

    def __init__(self, rate: float) -> None:
        self._rate = rate

    def success(self, now: float) -> float:
        return self._rate

    def throttle(self, rate: float, now: float) -> float:
        self._rate = rate / 2
        return self._rate

    def resume(self, rate: float, now: float) -> None:
        self._rate = rate


def test_a_controller_passed_in_by_its_caller_is_valid_for_it_alone_and_paces_the_limiter(tmp_path):
    from prometheus_client import CollectorRegistry

    from forwarder.app import Forwarder, StartupError

    built = []

    def factory(rate: float, max_rate: float, now: float) -> Halving:
        built.append((rate, max_rate, now))
        return Halving(rate)

    known = {"halving": factory}
    raw = {"evidently": {"rate_controller": "halving", "initial_rate": 8.0, "max_rate": 40.0},
           "dead_letter": {"path": str(tmp_path / "dl.ndjson")}}
    config = from_dict(raw, {}, known)
    fwd = Forwarder(config, registry=CollectorRegistry(), process_metrics=False, controllers=known)
    assert type(fwd.limiter.controller) is Halving
    limiter = RateLimiter(config.evidently.initial_rate, config.evidently.max_rate, factory, clock=FakeClock(3.0))
    limiter.on_throttle(sent_at=3.0)
    assert built[-1] == (8.0, 40.0, 3.0)
    assert limiter.rate == 4.0
    # Nothing was registered anywhere: the shipped configuration and composition root do not know it.
    with pytest.raises(ConfigError, match="evidently.rate_controller must be one of 'cubic', 'scaled'"):
        from_dict(raw, {})
    with pytest.raises(StartupError, match="evidently.rate_controller must be one of cubic, scaled, got 'halving'"):
        Forwarder(config, registry=CollectorRegistry(), process_metrics=False)
