"""Fleet simulation: M forwarders that do not know each other share one account quota.

    .venv/bin/python benchmarks/fleet.py [--forwarders 4 16 64] [--quota 100] [--duration 80]
                                         [--controller scaled cubic aimd dctcp] [--quick] [--json OUT] [--trace OUT]

M ``forwarder.app.Forwarder`` instances run in this process on one event loop,
each with its own buffer, batcher, sender, limiter, aiobotocore client, metrics
registry and access key (``fwd-<i>``); the emulator runs in its own process
(``forwarder emulator --no-record --quota Q``) so that it does not take the
forwarders' CPU, and attributes every request to a forwarder by its access key.
A feeder appends pre-encoded events straight into each buffer at a rate above
the forwarder's fair share, so the quota, not the offered load, is the bottleneck.

The quota follows a schedule: Q until half the run, Q/2 for a quarter, Q again.
Per run the report gives, from the emulator's counters:

* goodput: accepted events/s over the steady window [warm-up, D/2) divided by Q*50;
* throttled: throttled requests / requests over that window;
* jain: Jain's index of the per-forwarder accepted events over that window;
* down/up: re-convergence after the quota halves / doubles back (``reconvergence``);
  rate_down/rate_up: the same without its throttling condition (the rate alone);
* cpu: this process's CPU (the forwarders) and the emulator's, in cores, over the run.

``--trace`` writes every forwarder's counters and limiter rate every 0.2 s.
The "limiter experiments" options monkeypatch variants of the limiter into
each instance (forwarder/*.py stays as it is) to compare them with the same
fleet. Why this shape, the figures and the experiments: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import cpu_seconds, stop_process  # noqa: E402
from forwarder import config as config_mod  # noqa: E402
from forwarder import ratelimit  # noqa: E402
from forwarder.app import Forwarder  # noqa: E402
from forwarder.buffer import BufferFull  # noqa: E402
from forwarder.observability import configure_logging  # noqa: E402

EVENTS_PER_CALL = 50
SAMPLE_INTERVAL = 0.2  # seconds between two snapshots of the emulator's counters
WINDOW = 1.0  # seconds of the sliding window used for re-convergence
HOLD = 3.0  # seconds the window condition must keep holding to count as converged
BAND = (0.85, 1.10)  # accepted rate / quota that counts as "at the quota"
MAX_THROTTLED = 0.10  # throttled fraction under which the window counts as converged
FEED_TICK = 0.05  # seconds between two appends of the feeder
PROJECT = "fleet"


# --- analysis (pure) -------------------------------------------------------


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
    """Figures of one run from its samples; see the module docstring for each."""
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


# --- the emulator process --------------------------------------------------


class EmulatorProc:
    """``forwarder emulator`` in its own process, driven over its control API."""

    def __init__(self, quota: float, burst: float | None, log: Path) -> None:
        self.quota = quota
        self.burst = burst
        self._log_path = log
        self.url = ""
        self.popen: subprocess.Popen[bytes] | None = None

    async def start(self, timeout: float = 20.0) -> None:
        """Start on a free port and wait for its 'listening' line."""
        self._log = open(self._log_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "emulator", "--host", "127.0.0.1", "--port", "0",
             "--no-record", "--quota", str(self.quota),
             *(["--quota-burst", str(self.burst)] if self.burst else [])],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL)
        assert self.popen.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.popen.stdout.readline), timeout)
        if b"listening on " not in line:
            raise RuntimeError(f"emulator did not start: {line!r}; see {self._log_path}")
        self.url = line.split(b"listening on ", 1)[1].strip().decode()

    def cpu_seconds(self) -> float:
        """user + system CPU of the emulator process so far (Linux /proc)."""
        assert self.popen is not None
        return cpu_seconds(self.popen.pid)

    def stop(self) -> None:
        stop_process(self.popen)
        if hasattr(self, "_log"):
            self._log.close()


async def emulator_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/_emulator/stats") as r:
        return await r.json(loads=orjson.loads)


async def set_quota(session: aiohttp.ClientSession, url: str, quota: float) -> None:
    async with session.post(f"{url}/_emulator/config", json={"quota": quota}) as r:
        if r.status != 200:
            raise RuntimeError(f"emulator refused quota {quota}: {await r.text()}")


# --- limiter experiments (monkeypatched here; forwarder/ratelimit.py is not ours) ---


class ExperimentalCubic(ratelimit.Cubic):
    """CUBIC with the knobs the experiments turn (at their defaults: the shipped CUBIC).

    Each knob makes a small forwarder probe more gently, the diagnosis being
    that at 1-2 calls/s CUBIC's K is about a second, so the rate moves by more
    than the forwarder's share between two of its own calls:

    * ``c``, ``beta``: CUBIC's constants (0.4 and 0.7 shipped);
    * ``ref_rate``: C shrinks in proportion to W_max below it;
    * ``target``: C shrinks by target / (throttled fraction this forwarder saw
      lately, an EWMA of ``weight`` per answer) when that is above target;
    * ``k_min``: K, the time back to the last throttled rate, is at least this;
    * ``k_calls``: K spans at least this many calls at W_max.

    Measured (docs/scaling.md): each lowers throttling at 64 forwarders, and
    each costs fairness, because a forwarder that fell behind climbs back
    more slowly too.
    """

    def __init__(self, initial_rate: float, now: float, c: float, beta: float, ref_rate: float,
                 target: float, weight: float, k_min: float = 0.0, k_calls: float = 0.0) -> None:
        self._c, self._ref, self._target, self._weight, self._k_min = c, ref_rate, target, weight, k_min
        self._k_calls = k_calls
        self.throttled_fraction = 0.0
        super().__init__(initial_rate, now, scale=c, beta=beta)

    def observe(self, throttled: bool) -> None:
        self.throttled_fraction += self._weight * (float(throttled) - self.throttled_fraction)

    def _zero_point(self) -> float:
        scale = self._c
        if self._ref:
            scale *= min(1.0, self._w_max / self._ref)
        if self._target and self.throttled_fraction > self._target:
            scale *= max(0.01, self._target / self.throttled_fraction)
        self._scale = scale
        return max(super()._zero_point(), self._k_min, self._k_calls / self._w_max)

    def success(self, now: float) -> float:
        # The concave part reaches W_max at K whatever stretched K; with K from
        # C alone this is exactly the shipped curve. The convex part is unchanged.
        t = now - self._last_throttle
        if t < self._k:
            return self._w_max - (1 - self._beta) * self._w_max * ((self._k - t) / self._k) ** 3
        return self._scale * (t - self._k) ** 3 + self._w_max


class FifoPacer:
    """``RateLimiter.acquire`` that paces against the rate of now, not of the reservation.

    The shipped acquire books a slot and sleeps ``-tokens / rate`` with the rate
    of the moment it booked: with ``concurrency`` workers all waiting, the last
    one is committed ``concurrency / rate`` seconds ahead, so after a throttle
    the already booked calls still go out at the old rate (and are throttled in
    turn, each cutting the rate again), and after a cut the slow bookings hold
    the rate down for seconds. Here one waiter at a time (FIFO) waits for a
    whole token, re-checking after each sleep, so a decrease applies to the
    very next call. Measured: no difference in throttling, fairness or
    re-convergence at concurrency 4 or 16.
    """

    def __init__(self, limiter: ratelimit.RateLimiter) -> None:
        self._limiter = limiter
        self._lock = asyncio.Lock()

    async def acquire(self) -> float:
        lim = self._limiter
        async with self._lock:
            while True:
                now = lim._clock()
                lim._refill(now)
                if lim._tokens >= 1.0:
                    lim._tokens -= 1.0
                    break
                await asyncio.sleep((1.0 - lim._tokens) / lim.rate)
        lim._count(now)
        return now


def capped_success(limiter: ratelimit.RateLimiter, cap: float) -> Callable[[], None]:
    """``RateLimiter.on_success`` whose rate rises by at most ``cap`` (a fraction) per success.

    CUBIC's growth is per second: a forwarder sending 1.5 requests/s hears back
    every 0.7 s, and C*(t-K)^3 with C = 0.4 adds several times its share in
    the 2-3 s after K. Capping the rise per answer ties growth to feedback, as
    TCP's growth per ACK does; at 100 requests/s the cap is 100 * cap per
    second per second and CUBIC's own curve binds first. Measured: fewer
    throttles, much less fair (growth per answer favours the faster forwarder).
    """

    def on_success() -> None:
        now = limiter._clock()
        limiter._refill(now)
        rate = limiter._controller.success(now)
        ceiling = min(max(2 * limiter.measured, limiter.rate), limiter.rate * (1.0 + cap))
        limiter._set(min(rate, max(ceiling, limiter.rate)), "success")

    return on_success


def held_throttle(limiter: ratelimit.RateLimiter, hold: float) -> Callable[[float], None]:
    """``RateLimiter.on_throttle`` that counts at most one decrease per ``hold`` seconds.

    The shipped rule ignores throttles of calls sent before the last decrease
    (one per round trip). Against a shared quota the bucket stays empty until
    the whole fleet has slowed down, far longer than one forwarder's round
    trip, so a forwarder cuts again and again within one episode. Measured:
    more throttles, not fewer (the cuts are what empties the bucket).
    """
    on_throttle = limiter.on_throttle

    def throttle(sent_at: float) -> None:
        if sent_at < limiter._last_decrease + hold:
            return
        on_throttle(sent_at)

    return throttle


class Dctcp:
    """DCTCP's rule on throttles: rate *= 1 - alpha/2 once per round trip with throttles.

    ``alpha`` is an EWMA (``gain`` per ``interval`` seconds) of the fraction
    of this forwarder's calls that were throttled; the increase is ``growth``
    x the rate at the last decrease, per second. The idea: the token bucket
    throttles calls at random, so every forwarder sees about the same
    fraction, and a cut in proportion to it would stay fair while cutting
    less than CUBIC's 30%. Measured: 16.1% of calls throttled at M = 16 and
    25.8% at 64 (CUBIC: 8.9% and 25.1%). A forwarder with a share of 1.5
    calls/s sees a throttle only every few seconds, so cuts of alpha/2 (a few
    percent) cannot offset an increase fast enough to re-converge in 10 s
    (docs/scaling.md).
    """

    def __init__(self, initial_rate: float, now: float, interval: float = 1.0, gain: float = 1 / 16,
                 growth: float = 0.1) -> None:
        self._interval, self._gain, self._growth = interval, gain, growth
        self.alpha = 0.0
        self._rate = self._w_max = initial_rate
        self._answered = self._throttled = 0
        self._round_start = self._last = now

    def observe(self, throttled: bool, now: float) -> None:
        self._answered += 1
        self._throttled += throttled
        if now - self._round_start >= self._interval:
            self.alpha += self._gain * (self._throttled / self._answered - self.alpha)
            self._answered = self._throttled = 0
            self._round_start = now

    def success(self, now: float) -> float:
        self._rate += self._growth * self._w_max * max(0.0, now - self._last)
        self._last = now
        return self._rate

    def throttle(self, rate: float, now: float) -> float:
        self._w_max = rate
        self._rate = rate * (1 - self.alpha / 2)
        self._last = now
        return self._rate

    def resume(self, rate: float, now: float) -> None:
        self._rate, self._last = rate, now


EXPERIMENTAL_CONTROLLERS = ("dctcp",)  # built from "cubic", then swapped in by apply_experiment
SCALED_DEFAULTS = {name: param.default for name, param in inspect.signature(ratelimit.ScaledAimd).parameters.items()
                   if name in ("growth", "beta", "tau")}  # --scaled-* default to forwarder/ratelimit.py's
SHIPPED_MIN_RATE = ratelimit.MIN_RATE  # --min-rate's default; main() patches the module's


def experimenting(args: argparse.Namespace) -> bool:
    """Whether any CUBIC knob differs from forwarder/ratelimit.py's."""
    return bool(args.cubic_ref_rate or args.cubic_target or args.cubic_k_min or args.cubic_k_calls
                or args.cubic_c != 0.4 or args.cubic_beta != 0.7)


def scaled_experimenting(args: argparse.Namespace) -> bool:
    """Whether any ScaledAimd knob differs from forwarder/ratelimit.py's."""
    return (args.scaled_growth, args.scaled_beta, args.scaled_tau) != (
        SCALED_DEFAULTS["growth"], SCALED_DEFAULTS["beta"], SCALED_DEFAULTS["tau"])


def apply_experiment(fwd: Forwarder, args: argparse.Namespace, controller: str) -> None:
    """Swap in the experimental pacer and controller, when asked, before the forwarder starts."""
    limiter = fwd.limiter
    if args.pacer == "fifo":
        limiter.acquire = FifoPacer(limiter).acquire  # type: ignore[method-assign]
    if args.decrease_hold:
        limiter.on_throttle = held_throttle(limiter, args.decrease_hold)  # type: ignore[method-assign]
    if args.growth_cap:
        limiter.on_success = capped_success(limiter, args.growth_cap)  # type: ignore[method-assign]
    if controller == "scaled" and scaled_experimenting(args):
        limiter._controller = ratelimit.ScaledAimd(limiter.rate, limiter._clock(), limiter.max_rate,
                                                   growth=args.scaled_growth, beta=args.scaled_beta,
                                                   tau=args.scaled_tau)
        return
    if controller == "dctcp":
        dctcp = limiter._controller = Dctcp(limiter.rate, limiter._clock())
        observe_answers(limiter, lambda throttled: dctcp.observe(throttled, limiter._clock()))
        return
    if controller != "cubic" or not experimenting(args):
        return
    ctl = ExperimentalCubic(limiter.rate, limiter._clock(), args.cubic_c, args.cubic_beta, args.cubic_ref_rate,
                            args.cubic_target, args.cubic_weight, args.cubic_k_min, args.cubic_k_calls)
    limiter._controller = ctl
    observe_answers(limiter, lambda throttled: ctl.observe(throttled))


def observe_answers(limiter: ratelimit.RateLimiter, observe: Callable[[bool], None]) -> None:
    """Show ``observe`` every answer, throttles of calls sent before the last decrease included."""
    on_success, on_throttle = limiter.on_success, limiter.on_throttle

    def success() -> None:
        observe(False)
        on_success()

    def throttle(sent_at: float) -> None:
        observe(True)
        on_throttle(sent_at)

    limiter.on_success, limiter.on_throttle = success, throttle  # type: ignore[method-assign]


def experiment_label(args: argparse.Namespace) -> str:
    """The variants in use, for the report's first line ("" when none)."""
    parts = []
    if args.pacer == "fifo":
        parts.append("FIFO pacer")
    if args.growth_cap:
        parts.append(f"growth cap {args.growth_cap:g}/success")
    if args.decrease_hold:
        parts.append(f"one decrease per {args.decrease_hold:g} s")
    if experimenting(args):
        parts.append(f"CUBIC C={args.cubic_c:g} beta={args.cubic_beta:g} ref_rate={args.cubic_ref_rate:g} "
                     f"target={args.cubic_target:g} weight={args.cubic_weight:g} k_min={args.cubic_k_min:g} "
                     f"k_calls={args.cubic_k_calls:g}")
    if scaled_experimenting(args):
        parts.append(f"ScaledAimd growth={args.scaled_growth:g}/s beta={args.scaled_beta:g} "
                     f"tau={args.scaled_tau:g} s")
    if args.min_rate != SHIPPED_MIN_RATE:
        parts.append(f"MIN_RATE {args.min_rate:g}/s")
    return ", ".join(parts)


# --- the fleet -------------------------------------------------------------


def forwarder_config(i: int, url: str, args: argparse.Namespace, share: float, state: Path) -> config_mod.Config:
    """One instance: its own state, short retry backoffs, batches always full (the buffer never empties)."""
    raw = {
        "intake": {"host": "127.0.0.1", "port": 0},
        # Room for a few seconds of the offered load: a backlog that never empties.
        "buffer": {"type": "memory", "max_events": max(2000, int(share * args.overload * 5))},
        "batch": {"max_events": EVENTS_PER_CALL, "flush_interval": 1.0},
        "evidently": {"endpoint_url": url, "region": "us-east-1", "concurrency": args.concurrency,
                      "max_rate": max_rate(args, share), "initial_rate": float(args.initial_rate),
                      "request_timeout": 5.0},
        "retry": {"initial_backoff": 0.05, "max_backoff": 1.0, "max_elapsed": 3600.0},
        "dead_letter": {"path": str(state / f"fwd-{i}-dead-letter.ndjson")},
        "shutdown": {"drain_timeout": 0.2},
    }
    return config_mod.from_dict(raw, {})


def max_rate(args: argparse.Namespace, share: float) -> float:
    """evidently.max_rate: the whole quota Q (no forwarder knows the others), or a multiple of its share."""
    if args.max_rate_share:
        return max(1.0, args.max_rate_share * share / EVENTS_PER_CALL)
    return float(args.max_rate or args.quota)


def event_bytes(n: int) -> list[bytes]:
    """``n`` events in their final PutProjectEvents encoding (as the intake makes them), reused by every append."""
    now = time.time()
    return [orjson.dumps({"data": orjson.dumps({"i": i, "pad": "x" * 64}).decode(), "timestamp": now,
                          "type": "aws.evidently.custom"}) for i in range(n)]


class Feeder:
    """Appends events to every forwarder's buffer at ``rate`` events/s each."""

    def __init__(self, forwarders: Sequence[Forwarder], rate: float) -> None:
        self._forwarders = forwarders
        self._rate = rate
        self._pool = event_bytes(max(EVENTS_PER_CALL, int(rate * FEED_TICK * 2) + 1))
        self._owed = [0.0] * len(forwarders)
        self.offered = 0
        self.rejected = 0

    async def run(self, until: float, clock: Callable[[], float]) -> None:
        last = clock()
        while (now := clock()) < until:
            for i, fwd in enumerate(self._forwarders):
                self._owed[i] += self._rate * (now - last)
                n = min(int(self._owed[i]), len(self._pool))
                if n == 0:
                    continue
                self._owed[i] -= n
                self.offered += n
                try:
                    await fwd.buffer.append(PROJECT, self._pool[:n], time.time())
                except BufferFull:
                    self.rejected += n  # the backlog is full: the quota is the bottleneck, as intended
            last = now
            await asyncio.sleep(FEED_TICK)


async def sample_loop(session: aiohttp.ClientSession, url: str, forwarders: Sequence[Forwarder], t0: float,
                      until: float, out: list[Sample], lags: list[float]) -> None:
    """Snapshot the emulator's per-key counters and each limiter's rate every SAMPLE_INTERVAL."""
    due = time.monotonic()
    while True:
        now = time.monotonic()
        lags.append(max(0.0, now - due))
        stats = await emulator_stats(session, url)
        t = time.monotonic() - t0
        keys = stats["access_keys"]
        out.append(Sample(
            t=t,
            accepted={k: v["accepted_events"] for k, v in keys.items()},
            requests={k: v["requests"] for k, v in keys.items()},
            throttled={k: v["throttled"] for k, v in keys.items()},
            rates={f"fwd-{i}": f.limiter.rate for i, f in enumerate(forwarders)},
        ))
        if t >= until:
            return
        due += SAMPLE_INTERVAL
        await asyncio.sleep(max(0.0, due - time.monotonic()))


async def quota_schedule(session: aiohttp.ClientSession, url: str, sched: Schedule, t0: float) -> None:
    for at, quota in sched.steps():
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        await set_quota(session, url, quota)


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_fleet(m: int, controller: str, args: argparse.Namespace, state: Path) -> tuple[Result, list[Sample]]:
    """One run: start the emulator and M forwarders, feed, change the quota, measure, stop."""
    sched = Schedule(args.quota, args.duration, args.warmup)
    share = args.quota * EVENTS_PER_CALL / m  # events/s of one forwarder's fair share
    emu = EmulatorProc(args.quota, args.quota_burst, state / f"emulator-{controller}-{m}.log")
    await emu.start()
    forwarders: list[Forwarder] = []
    try:
        for i in range(m):
            fwd = Forwarder(forwarder_config(i, emu.url, args, share, state), credentials=(f"fwd-{i}", "secret"),
                            registry=CollectorRegistry(), process_metrics=False,
                            rate_controller="cubic" if controller in EXPERIMENTAL_CONTROLLERS else controller)
            apply_experiment(fwd, args, controller)
            forwarders.append(fwd)
            await fwd.start()
        # As `forwarder run` does after start-up: M forwarders' botocore models are
        # M x ~80k long-lived objects, and every full collection walking them
        # stalled the one loop of the fleet (sampler p99 0.5 s late at M=64, Q=500).
        gc.collect()
        gc.freeze()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            feeder = Feeder(forwarders, share * args.overload)
            samples: list[Sample] = []
            lags: list[float] = []
            cpu0, emu_cpu0 = _cpu_self(), emu.cpu_seconds()
            t0 = time.monotonic()
            await asyncio.gather(
                feeder.run(t0 + sched.duration, time.monotonic),
                sample_loop(session, emu.url, forwarders, t0, sched.duration, samples, lags),
                quota_schedule(session, emu.url, sched, t0),
            )
            elapsed = time.monotonic() - t0
            extra = {
                "fleet_cpu": (_cpu_self() - cpu0) / elapsed,
                "emulator_cpu": (emu.cpu_seconds() - emu_cpu0) / elapsed,
                "loop_lag_p99": sorted(lags)[int(0.99 * (len(lags) - 1))],
                "feed_rejected": feeder.rejected / feeder.offered if feeder.offered else 0.0,
            }
        return summarize(samples, sched, controller, m, extra), samples
    finally:
        await asyncio.gather(*(f.shutdown() for f in forwarders), return_exceptions=True)
        emu.stop()


# --- report ----------------------------------------------------------------


COLUMNS = ("controller", "forwarders", "quota", "goodput", "throttled", "jain", "reconverge_down",
           "reconverge_up", "rate_down", "rate_up", "goodput_half", "goodput_back", "fleet_cpu", "emulator_cpu")


def _cell(value: Any) -> str:
    if value is None:
        return "none"  # did not re-converge within the phase
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def table(results: Sequence[Result]) -> str:
    """A Markdown table, one row per run."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        rows.append("| " + " | ".join(_cell(getattr(r, c)) for c in COLUMNS) + " |")
    return "\n".join(rows)


def write_trace(path: Path, runs: Sequence[tuple[Result, list[Sample]]]) -> None:
    """Per-forwarder trace (long CSV): accepted events, throttled requests and limiter rate per sample."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["controller", "forwarders", "t", "key", "accepted_events", "requests", "throttled", "rate"])
        for result, samples in runs:
            for s in samples:
                for key, rate in s.rates.items():
                    out.writerow([result.controller, result.forwarders, f"{s.t:.3f}", key, s.accepted.get(key, 0),
                                  s.requests.get(key, 0), s.throttled.get(key, 0), f"{rate:.3f}"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--forwarders", type=int, nargs="+", default=[4, 16, 64], help="fleet sizes M to run")
    p.add_argument("--controller", nargs="+", choices=(*ratelimit.CONTROLLERS, *EXPERIMENTAL_CONTROLLERS),
                   default=["scaled"], help="rate controller(s) to run (dctcp: the Dctcp experiment)")
    p.add_argument("--quota", type=float, default=100.0, help="account quota Q, requests/s")
    p.add_argument("--quota-burst", type=float, default=None,
                   help="emulator token bucket size (default: one second of quota, the emulator's default)")
    p.add_argument("--duration", type=float, default=80.0, help="seconds per run; Q/2 from D/2, Q again from 3D/4")
    p.add_argument("--warmup", type=float, default=None, help="seconds excluded from the steady window (default D/8)")
    p.add_argument("--overload", type=float, default=2.0, help="offered load per forwarder / its fair share")
    p.add_argument("--concurrency", type=int, default=4, help="evidently.concurrency of each forwarder")
    p.add_argument("--max-rate", type=float, default=0.0,
                   help="evidently.max_rate of every forwarder (0: Q); AIMD's increase is max_rate/100 per second")
    p.add_argument("--max-rate-share", type=float, default=0.0,
                   help="evidently.max_rate = this x Q/M (0: Q, every forwarder believes it may use the whole quota)")
    p.add_argument("--initial-rate", type=float, default=0.0, help="evidently.initial_rate (0: max_rate/10)")
    x = p.add_argument_group("limiter experiments (defaults are forwarder/ratelimit.py's; --cubic-* apply to CUBIC, "
                             "--scaled-* to ScaledAimd)")
    x.add_argument("--pacer", choices=("shipped", "fifo"), default="shipped",
                   help="fifo: RateLimiter.acquire re-checks the current rate (FifoPacer)")
    x.add_argument("--decrease-hold", type=float, default=0.0,
                   help="ignore throttles of calls sent within this many seconds of the last decrease (0: off)")
    x.add_argument("--growth-cap", type=float, default=0.0,
                   help="the rate rises by at most this fraction per successful call (0: off)")
    x.add_argument("--cubic-c", type=float, default=0.4, help="CUBIC's C, requests/s^3")
    x.add_argument("--cubic-beta", type=float, default=0.7, help="CUBIC's multiplicative decrease")
    x.add_argument("--cubic-ref-rate", type=float, default=0.0, help="scale C by W_max/REF below REF req/s (0: off)")
    x.add_argument("--cubic-k-min", type=float, default=0.0,
                   help="at least this many seconds back to the last throttled rate (0: off)")
    x.add_argument("--cubic-k-calls", type=float, default=0.0,
                   help="at least this many calls (at W_max) back to the last throttled rate (0: off)")
    x.add_argument("--cubic-target", type=float, default=0.0,
                   help="scale C by target/(throttled fraction seen) above target (0: off)")
    x.add_argument("--cubic-weight", type=float, default=0.05, help="EWMA weight per response of that fraction")
    x.add_argument("--scaled-growth", type=float, default=SCALED_DEFAULTS["growth"],
                   help="ScaledAimd's increase per second, a fraction of its slow average rate")
    x.add_argument("--scaled-beta", type=float, default=SCALED_DEFAULTS["beta"],
                   help="ScaledAimd's cut on a throttle: the rate becomes rate x (1 - beta)")
    x.add_argument("--scaled-tau", type=float, default=SCALED_DEFAULTS["tau"],
                   help="seconds of ScaledAimd's slow average of its own rate")
    x.add_argument("--min-rate", type=float, default=SHIPPED_MIN_RATE,
                   help="ratelimit.MIN_RATE, the floor of every limiter's rate, requests/s")
    p.add_argument("--quick", action="store_true", help="smoke run: M=4, 8 s")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--trace", type=Path, help="write per-forwarder samples as CSV here")
    args = p.parse_args(argv)
    if args.quick:
        args.forwarders, args.duration = [4], 8.0
    if args.warmup is None:
        args.warmup = args.duration / 8
    if not 0 <= args.warmup < args.duration / 2:
        p.error("--warmup must be below half of --duration")
    return args


async def main(args: argparse.Namespace) -> list[tuple[Result, list[Sample]]]:
    runs = []
    ratelimit.MIN_RATE = args.min_rate  # a module global, read by every RateLimiter each time its rate changes
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        state = Path(tmp)
        # Warnings of 64 forwarders go to a file; the report stays readable.
        with open(state / "forwarders.log", "w") as log:
            configure_logging("error", "json", stream=log)
            for controller in args.controller:
                for m in args.forwarders:
                    result, samples = await run_fleet(m, controller, args, state)
                    print(table([result]).splitlines()[-1], flush=True)
                    runs.append((result, samples))
    return runs


def cli(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"# fleet: Q={args.quota:g} req/s, D={args.duration:g} s, warm-up {args.warmup:g} s, "
          f"offered {args.overload:g}x share, concurrency {args.concurrency}, cpus {os.cpu_count()}"
          + (f", max_rate {args.max_rate:g}" if args.max_rate else "")
          + (f", max_rate {args.max_rate_share:g} x share" if args.max_rate_share else "")
          + (f", experiment: {experiment_label(args)}" if experiment_label(args) else ""), flush=True)
    print(table([]), flush=True)
    try:
        import uvloop  # as `forwarder run` does: the fleet's CPU should be the forwarders', not the loop's
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runs = runner.run(main(args))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r, _ in runs], indent=2))
    if args.trace:
        write_trace(args.trace, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
