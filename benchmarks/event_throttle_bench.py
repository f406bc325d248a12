"""Per-event throttling (issue 25): what a few throttled entries inside 200s cost.

Two setups, each with the emulator's ``--throttle-event-rate`` (that fraction of
events answered ``ThrottlingException`` inside a 200, at random):

* **Demand under the quota.** ``forwarder run`` with its defaults (memory
  buffer of 100,000 events, ``max_rate`` the region's 1000 calls/s) and the
  emulator at ``--quota 1000``; a paced load of small POSTs (1-10 events) to
  ``BUSY`` busy and ``OCCASIONAL`` occasional projects, which makes many
  partly filled calls. Goodput is the events at the emulator ``GRACE`` seconds
  after the last POST over the events the forwarder acknowledged; then the
  backlog drains and the emulator's recording must hold every acknowledged
  event exactly once (no loss, no duplicate), with no POST answered 429.
* **Demand above a real quota.** The emulator at ``--quota QUOTA`` (429 above
  it) with 1% per-event throttles on top; 500-event POSTs at ``OVERLOAD`` x
  the quota's worth of events. Accepted calls per second over the quota, and
  the throttled (429) fraction of calls, after the first 2 s.

    .venv/bin/python -m benchmarks --only event-throttles        (part of make bench)
    .venv/bin/python -m benchmarks.event_throttle_bench [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import procs, report  # noqa: E402
from benchmarks.context import Context  # noqa: E402
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess  # noqa: E402

BUSY, OCCASIONAL = 20, 200  # projects
BUSY_SHARE = 0.8  # of the POSTs go to a busy project
POSTS = 300.0  # per second, 1-10 events each: about 1,650 events/s in 70-90 calls/s
UNDER_QUOTA = 1000.0  # calls/s: the quota of the three largest regions
GRACE = 2.0  # seconds after the last POST: flush_interval (1 s) and a retry
QUOTA = 100.0  # calls/s for the quota runs
OVERLOAD = 1.3  # offered events / what the quota can carry in full calls
SETTLE = 2.0  # seconds of the quota runs left out of the figures
SEED = 25


@dataclass
class UnderQuota:
    throttled: float  # the emulator's --throttle-event-rate
    offered: int = 0  # events acknowledged to the load generator
    refused: int = 0  # POSTs answered anything but 200 (429 when the buffer is full)
    delivered_in_run: int = 0
    delivered: int = 0  # after the drain
    duplicates: int = 0
    dead_letters: int = 0
    calls: int = 0  # calls during the run
    throttled_events: int = 0  # entries the emulator throttled during the run
    queue_at_end: float = 0.0
    send_rate_at_end: float = 0.0
    seconds: float = 0.0

    @property
    def goodput(self) -> float:
        return self.delivered_in_run / self.offered if self.offered else float("nan")

    @property
    def exact(self) -> bool:
        """Every acknowledged event at the emulator exactly once, none refused or dead-lettered."""
        return (self.delivered == self.offered and not self.duplicates and not self.dead_letters
                and not self.refused)


@dataclass
class AboveQuota:
    throttled: float
    seconds: float = 0.0  # after the first SETTLE s
    accepted_calls: int = 0
    throttled_calls: int = 0
    events: int = 0
    send_rate_at_end: float = 0.0

    @property
    def of_quota(self) -> float:
        return self.accepted_calls / (QUOTA * self.seconds)

    @property
    def throttled_fraction(self) -> float:
        calls = self.accepted_calls + self.throttled_calls
        return self.throttled_calls / calls if calls else 0.0

    @property
    def events_of_quota(self) -> float:
        return self.events / (QUOTA * 50 * self.seconds)


class Load:
    """POSTs at a fixed schedule; each event unique (the emulator's recording catches duplicates)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, seed: int) -> None:
        self._session, self._url = session, url
        self._rng = random.Random(seed)
        self._next_id = 0
        self.offered = self.refused = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(128)  # POSTs in flight at most: a slow intake slows the load

    def _body(self, n: int) -> bytes:
        start, self._next_id = self._next_id, self._next_id + n
        return orjson.dumps({"events": [
            {"data": orjson.dumps({"id": i, "user": f"u{i % 977}", "value": i % 97}).decode(),
             "timestamp": 1764158400.0, "type": "aws.evidently.custom"} for i in range(start, start + n)]})

    async def _post(self, project: str, n: int) -> None:
        try:
            async with self._session.post(f"{self._url}/events/projects/{project}", data=self._body(n),
                                          headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status == 200:
                    self.offered += n
                else:
                    self.refused += 1
        finally:
            self._slots.release()

    def _pick(self, busy: int, occasional: int) -> str:
        if self._rng.random() < BUSY_SHARE or not occasional:
            return f"busy-{self._rng.randrange(busy)}"
        return f"occasional-{self._rng.randrange(occasional)}"

    async def run(self, seconds: float, posts: float, sizes: tuple[int, int], busy: int, occasional: int) -> None:
        started = time.monotonic()
        total = int(seconds * posts)
        for k in range(total):
            await asyncio.sleep(max(0.0, started + k / posts - time.monotonic()))
            await self._slots.acquire()
            task = asyncio.create_task(self._post(self._pick(busy, occasional), self._rng.randint(*sizes)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.gather(*self._tasks)


def _sections(emu: EmulatorProcess, tmp: Path, **evidently: float) -> dict:
    return {
        "buffer": {"type": "memory"},  # the defaults a new user has: 100,000 events
        "evidently": {"endpoint_url": emu.url, "region": "us-east-1", **evidently},
        "shutdown": {"drain_timeout": 0.5},
        "dead_letter": {"path": str(tmp / "dead-letter.ndjson")},
        "log": {"level": "warning"},
    }


async def under_quota(session: aiohttp.ClientSession, tmp: Path, throttled: float, seconds: float,
                      posts: float) -> UnderQuota:
    result = UnderQuota(throttled, seconds=seconds)
    emu = procs.emulator(tmp, "--quota", str(UNDER_QUOTA), "--throttle-event-rate", str(throttled),
                         "--seed", str(SEED))
    fwd: ForwarderProcess = procs.forwarder(tmp, _sections(emu, tmp), name=f"fwd-{throttled}")
    try:
        await emu.launch(session)
        await fwd.launch(session)
        load = Load(session, fwd.url, SEED)
        await load.run(seconds, posts, (1, 10), BUSY, OCCASIONAL)
        await asyncio.sleep(GRACE)
        stats = await emu.stats(session)
        result.offered, result.refused = load.offered, load.refused
        result.delivered_in_run = stats["events_accepted"]
        result.calls = stats["requests_total"]
        result.throttled_events = stats["events_failed_by_code"].get("ThrottlingException", 0)
        result.queue_at_end = await fwd.metric(session, "forwarder_queue_depth")
        result.send_rate_at_end = await fwd.metric(session, "forwarder_send_rate")
        await fwd.wait_drained(session, 120.0)
        stats = await emu.stats(session)
        result.delivered, result.duplicates = stats["events_accepted"], stats["duplicates"]
        result.dead_letters = len(fwd.dead_letters())
        return result
    finally:
        fwd.stop()
        emu.stop()


async def above_quota(session: aiohttp.ClientSession, tmp: Path, throttled: float, seconds: float) -> AboveQuota:
    result = AboveQuota(throttled)
    emu = procs.emulator(tmp, "--quota", str(QUOTA), "--throttle-event-rate", str(throttled), "--seed", str(SEED),
                         "--no-record", name=f"emulator-quota-{throttled}")
    sections = _sections(emu, tmp)
    sections["buffer"]["max_events"] = 1_000_000  # demand above the quota: the backlog grows all run long
    fwd = procs.forwarder(tmp, sections, name=f"fwd-quota-{throttled}")
    try:
        await emu.launch(session)
        await fwd.launch(session)
        load = Load(session, fwd.url, SEED)
        posts = OVERLOAD * QUOTA * 50 / 500
        running = asyncio.create_task(load.run(seconds, posts, (500, 500), 4, 0))
        t0 = time.monotonic()
        await asyncio.sleep(SETTLE)
        first = await emu.stats(session)
        await running
        last = await emu.stats(session)
        result.seconds = time.monotonic() - t0 - SETTLE
        by_status = {k: last["requests_by_status"].get(k, 0) - first["requests_by_status"].get(k, 0)
                     for k in ("200", "429")}
        result.accepted_calls, result.throttled_calls = by_status["200"], by_status["429"]
        result.events = last["events_accepted"] - first["events_accepted"]
        result.send_rate_at_end = await fwd.metric(session, "forwarder_send_rate")
        return result
    finally:
        fwd.stop()
        emu.stop()


def _under_row(r: UnderQuota, target: float) -> report.Row:
    ok = report.at_least(r.goodput, target) and r.exact
    note = (f"{r.offered:,} events acknowledged in {r.seconds:.0f} s, {r.delivered_in_run:,} at the emulator "
            f"{GRACE:.0f} s after the last POST, {r.delivered:,} after the drain ({r.duplicates} duplicates, "
            f"{r.dead_letters} dead letters, {r.refused} POSTs refused); {r.calls / (r.seconds + GRACE):.0f} "
            f"calls/s, {r.throttled_events:,} entries throttled; queue {r.queue_at_end:.0f} and "
            f"forwarder_send_rate {r.send_rate_at_end:.0f} at the end")
    return report.Row("event-throttles", f"goodput, {r.throttled:.0%} of events throttled, demand under the quota",
                      f"{r.delivered_in_run:,} delivered in the run, {'exact' if r.exact else 'NOT exact'}",
                      f"{r.offered:,} offered", r.goodput, f">= {target}, none lost, duplicated or refused", ok,
                      [note])


def _above_row(r: AboveQuota) -> report.Row:
    ok = report.at_least(r.of_quota, 0.9) and r.throttled_fraction <= 0.10
    note = (f"{r.accepted_calls} calls accepted and {r.throttled_calls} throttled in {r.seconds:.1f} s after the "
            f"first {SETTLE:.0f} s; events {r.events_of_quota:.2f} of the quota's 50 per call; "
            f"forwarder_send_rate {r.send_rate_at_end:.0f} at the end")
    return report.Row("event-throttles",
                      f"accepted calls at a {QUOTA:.0f} calls/s quota, {r.throttled:.0%} of events throttled",
                      f"{r.accepted_calls / r.seconds:.1f} calls/s ({r.throttled_fraction:.1%} throttled)",
                      f"quota {QUOTA:.0f} calls/s", r.of_quota, ">= 0.9 and <= 10% throttled", ok, [note])


async def event_throttles(ctx: Context, seconds: float | None = None) -> list[report.Row]:
    run_s = seconds or ctx.pick(30.0, 3.0)
    quota_s = seconds or ctx.pick(20.0, 3.0)
    # The smoke run checks that the rows still come out: the 1% cases only.
    under = ctx.pick([(0.0, 0.95), (0.01, 0.95), (0.05, 0.9)], [(0.01, 0.95)])
    above = ctx.pick([0.0, 0.01], [0.01])
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i, (throttled, target) in enumerate(under):
            case = Path(d) / f"under-{i}"
            case.mkdir()
            rows.append(_under_row(await under_quota(ctx.session, case, throttled, run_s, POSTS), target))
        for i, throttled in enumerate(above):
            case = Path(d) / f"above-{i}"
            case.mkdir()
            rows.append(_above_row(await above_quota(ctx.session, case, throttled, quota_s)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="length of each run (default 30 and 20 s)")
    args = parser.parse_args(argv)

    async def run() -> list[report.Row]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            with tempfile.TemporaryDirectory() as d:
                return await event_throttles(Context(session, Path(d), False, False), args.seconds)

    print(report.table(asyncio.run(run())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
