"""One fleet run and the command line: M forwarders on this process's loop, the emulator in its own process."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from benchmarks.fleet import controllers
from benchmarks.fleet.analysis import EVENTS_PER_CALL, SAMPLE_INTERVAL, Result, Sample, Schedule, summarize
from benchmarks.fleet.report import table, write_trace
from benchmarks.procs import cpu_seconds, emulator
from forwarder import config as config_mod
from forwarder.delivery import rate as ratelimit
from forwarder.app import Forwarder
from forwarder.buffer.contract import BufferFull
from forwarder.observability import configure_logging
from forwarder.emulator.harness import EmulatorProcess

FEED_TICK = 0.05  # seconds between two appends of the feeder
PROJECT = "fleet"


def forwarder_config(i: int, url: str, args: argparse.Namespace, share: float, state: Path,
                     rate_controller: str, known: Mapping[str, ratelimit.ControllerFactory]) -> config_mod.Config:
    """One instance: its own state, short retry backoffs, batches always full (the buffer never empties)."""
    raw = {
        "intake": {"host": "127.0.0.1", "port": 0},
        # Room for a few seconds of the offered load: a backlog that never empties.
        "buffer": {"type": "memory", "max_events": max(2000, int(share * args.overload * 5))},
        "batch": {"max_events": EVENTS_PER_CALL, "flush_interval": 1.0},
        "evidently": {"endpoint_url": url, "region": "us-east-1", "concurrency": args.concurrency,
                      "max_rate": max_rate(args, share), "initial_rate": float(args.initial_rate),
                      "request_timeout": 5.0, "rate_controller": rate_controller},
        "retry": {"initial_backoff": 0.05, "max_backoff": 1.0, "max_elapsed": 3600.0},
        "dead_letter": {"path": str(state / f"fwd-{i}-dead-letter.ndjson")},
        "shutdown": {"drain_timeout": 0.2},
    }
    return config_mod.from_dict(raw, {}, known)


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


async def sample_loop(session: aiohttp.ClientSession, emu: EmulatorProcess, forwarders: Sequence[Forwarder],
                      t0: float, until: float, out: list[Sample], lags: list[float]) -> None:
    """Snapshot the emulator's per-key counters and each limiter's rate every SAMPLE_INTERVAL."""
    due = time.monotonic()
    while True:
        now = time.monotonic()
        lags.append(max(0.0, now - due))
        stats = await emu.stats(session)
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


async def quota_schedule(session: aiohttp.ClientSession, emu: EmulatorProcess, sched: Schedule, t0: float) -> None:
    for at, quota in sched.steps():
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        await emu.configure(session, quota=quota)


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_fleet(m: int, controller: str, args: argparse.Namespace, state: Path) -> tuple[Result, list[Sample]]:
    """One run: start the emulator and M forwarders, feed, change the quota, measure, stop."""
    sched = Schedule(args.quota, args.duration, args.warmup)
    share = args.quota * EVENTS_PER_CALL / m  # events/s of one forwarder's fair share
    rate_controller, factory = controllers.controller_for(controller, args)
    known = {rate_controller: factory}
    burst = ["--quota-burst", str(args.quota_burst)] if args.quota_burst else []
    # Not pinned: the forwarders of this process and the emulator share the machine as before.
    emu = emulator(state, "--no-record", "--quota", str(args.quota), *burst, core=None,
                   name=f"emulator-{controller}-{m}")
    forwarders: list[Forwarder] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        try:
            await emu.launch(session)
            for i in range(m):
                fwd = Forwarder(forwarder_config(i, emu.url, args, share, state, rate_controller, known),
                                credentials=(f"fwd-{i}", "secret"), registry=CollectorRegistry(),
                                process_metrics=False, controllers=known)
                forwarders.append(fwd)
                await fwd.start()
            # As `forwarder run` does after start-up: M forwarders' botocore models are
            # M x ~80k long-lived objects, and every full collection walking them
            # stalled the one loop of the fleet (docs/scaling.md, "Results on Q = 500").
            gc.collect()
            gc.freeze()
            feeder = Feeder(forwarders, share * args.overload)
            samples: list[Sample] = []
            lags: list[float] = []
            cpu0, emu_cpu0 = _cpu_self(), cpu_seconds(emu.pid)
            t0 = time.monotonic()
            await asyncio.gather(
                feeder.run(t0 + sched.duration, time.monotonic),
                sample_loop(session, emu, forwarders, t0, sched.duration, samples, lags),
                quota_schedule(session, emu, sched, t0),
            )
            elapsed = time.monotonic() - t0
            extra = {
                "fleet_cpu": (_cpu_self() - cpu0) / elapsed,
                "emulator_cpu": (cpu_seconds(emu.pid) - emu_cpu0) / elapsed,
                "loop_lag_p99": sorted(lags)[int(0.99 * (len(lags) - 1))],
                "feed_rejected": feeder.rejected / feeder.offered if feeder.offered else 0.0,
            }
            return summarize(samples, sched, controller, m, extra), samples
        finally:
            await asyncio.gather(*(f.shutdown() for f in forwarders), return_exceptions=True)
            emu.stop()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet",
                                description="M forwarders that do not know each other share one account quota "
                                            "(docs/scaling.md).")
    p.add_argument("--forwarders", type=int, nargs="+", default=[4, 16, 64], help="fleet sizes M to run")
    p.add_argument("--controller", nargs="+", choices=tuple(controllers.FLEET_CONTROLLERS), default=["scaled"],
                   help="rate controller(s) to run: forwarder/delivery/rate.py's, or one of "
                        "benchmarks/fleet/controllers.py (aimd, dctcp)")
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
    controllers.add_arguments(p)
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
    label = controllers.experiment_label(args)
    print(f"# fleet: Q={args.quota:g} req/s, D={args.duration:g} s, warm-up {args.warmup:g} s, "
          f"offered {args.overload:g}x share, concurrency {args.concurrency}, cpus {os.cpu_count()}"
          + (f", max_rate {args.max_rate:g}" if args.max_rate else "")
          + (f", max_rate {args.max_rate_share:g} x share" if args.max_rate_share else "")
          + (f", experiment: {label}" if label else ""), flush=True)
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
