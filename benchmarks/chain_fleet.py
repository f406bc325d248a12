"""Chaining on one quota: M sidecars -> 2 central forwarders -> Evidently, against M sidecars -> Evidently.

    .venv/bin/python benchmarks/chain_fleet.py [--sidecars 16 64] [--quota 50] [--load 0.8]
                                               [--duration 40] [--warmup 10] [--json OUT]

Many small producers: M sidecars, each fed ``load x Q x 50 / M`` events/s (the
whole fleet offers ``load`` of what the quota could carry in full batches). The
sidecars are ``forwarder.app.Forwarder`` instances in this process on one event
loop, fed straight into their buffers (the intake is not what is measured). The
emulator (``forwarder emulator --quota Q``) and, when chained, the two central
forwarders (``forwarder run``, ``intake.auth = "sigv4"``, disk buffer,
``max_rate`` = Q) are processes of their own; sidecar i sends to central i % 2,
signing with its own key pair. Sidecars going direct use the fleet settings
docs/scaling.md recommends (``rate_controller = "scaled"``, ``max_rate`` = Q);
chained ones the example's (deploy/kubernetes/sidecar-chained: the defaults).

Per run, over the steady window [warmup, duration), from the emulator's counters:
goodput (events accepted / events offered), the throttled fraction of calls to
Evidently, events per accepted call, calls/s; for the chain also the throttled
fraction of the sidecars' calls to the central tier (its 429s). From the events
the emulator recorded: delivery latency, feed to Evidently, p50 and p99. CPU:
the central tier's processes, in cores. Figures and discussion: docs/scaling.md,
"Chaining sidecars into a central tier".
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import stats  # noqa: E402
from benchmarks.procs import cpu_seconds, emulator, forwarder, forwarder_sections  # noqa: E402
from forwarder import config as config_mod  # noqa: E402
from forwarder.app import Forwarder  # noqa: E402
from forwarder.buffer.contract import BufferFull  # noqa: E402
from forwarder.observability import configure_logging  # noqa: E402
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, emulator_events, emulator_stats  # noqa: E402

EVENTS_PER_CALL = 50
REGION = "us-east-1"
SECRET = "chain-secret"
PROJECT = "chain"
FEED_TICK = 0.05  # seconds between two appends of the feeder
CENTRALS = 2


@dataclass(frozen=True)
class Result:
    topology: str  # "direct" or "chained"
    sidecars: int
    quota: float
    offered: float  # events/s, steady window
    goodput: float  # accepted / offered events
    throttled: float  # fraction of the calls to Evidently answered 429
    events_per_call: float  # accepted events per accepted call to Evidently
    calls_per_s: float  # calls to Evidently, throttled included
    hop_throttled: float | None  # chained: fraction of the sidecars' calls the central tier answered 429
    latency_p50: float  # seconds from feed to Evidently
    latency_p99: float
    central_cpu: float | None  # cores used by the central tier's processes
    sidecar_cpu: float  # cores used by this process (every sidecar)


class Feeder:
    """Appends events stamped with their feed time to every sidecar's buffer at ``rate`` events/s each."""

    def __init__(self, sidecars: Sequence[Forwarder], rate: float) -> None:
        self._sidecars = sidecars
        self._rate = rate
        self._owed = [0.0] * len(sidecars)
        self.offered = 0
        self.rejected = 0

    async def run(self, until: float) -> None:
        last = time.monotonic()
        while (now := time.monotonic()) < until:
            wall = time.time()
            event = orjson.dumps({"data": orjson.dumps({"t": wall, "pad": "x" * 160}).decode(), "timestamp": wall,
                                  "type": "aws.evidently.custom"})
            for i, fwd in enumerate(self._sidecars):
                self._owed[i] += self._rate * (now - last)
                n = int(self._owed[i])
                if n == 0:
                    continue
                self._owed[i] -= n
                self.offered += n
                try:
                    await fwd.buffer.append(PROJECT, [event] * n, wall)
                except BufferFull:
                    self.rejected += n
            last = now
            await asyncio.sleep(FEED_TICK)


def sidecar_config(i: int, url: str, chained: bool, quota: float, state: Path) -> config_mod.Config:
    evidently: dict[str, Any] = {"endpoint_url": url, "region": REGION, "request_timeout": 5.0}
    if not chained:
        evidently.update(rate_controller="scaled", max_rate=quota)
    return config_mod.from_dict({
        "intake": {"host": "127.0.0.1", "port": 0},
        "buffer": {"type": "memory", "max_events": 200_000},
        "batch": {"max_events": EVENTS_PER_CALL, "flush_interval": 1.0},
        "evidently": evidently,
        "retry": {"max_elapsed": 3600.0},
        "dead_letter": {"path": str(state / f"sidecar-{i}-dead-letter.ndjson")},
        "shutdown": {"drain_timeout": 0.2},
        "log": {"level": "error"},
    }, {})


async def start_centrals(session: aiohttp.ClientSession, logdir: Path, emu: EmulatorProcess, m: int,
                         quota: float) -> list[ForwarderProcess]:
    creds = logdir / "central-credentials"
    creds.write_text("".join(f"[sidecar-{i}]\naws_access_key_id = side-{i}\naws_secret_access_key = {SECRET}\n"
                             for i in range(m)))
    centrals = []
    for c in range(CENTRALS):
        sections = forwarder_sections(
            logdir, f"central-{c}", emu.url,
            intake={"auth": "sigv4", "credentials_file": str(creds)},
            evidently={"region": REGION, "max_rate": quota, "initial_rate": 0.0, "concurrency": 8},
            buffer={"type": "disk", "max_events": 1_000_000, "max_bytes": 2**30})
        central = forwarder(logdir, sections, name=f"central-{c}", core=None)
        centrals.append(central)
        await central.launch(session)
    return centrals


def request_count(fwd: Forwarder, name: str) -> float:
    """The sum of a counter's samples over all its labels, from an in-process forwarder's registry."""
    return sum(s.value for family in fwd.metrics.registry.collect() for s in family.samples if s.name == name)


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def recorded_latencies(session: aiohttp.ClientSession, url: str, start: float, end: float) -> list[float]:
    out = []
    for e in await emulator_events(session, url):
        fed = orjson.loads(e["data"])["t"]
        if start <= fed < end:
            out.append(e["received_at"] - fed)
    return out


class Snapshot:
    """Every counter the result needs, at one moment."""

    def __init__(self, emu: dict[str, Any], sidecars: Sequence[Forwarder], centrals: Sequence[ForwarderProcess],
                 offered: int) -> None:
        self.t = time.monotonic()
        self.calls = emu["requests_total"]
        self.throttled = emu["throttled_requests"]
        self.accepted = emu["events_accepted"]
        self.offered = offered
        self.hop_calls = sum(request_count(f, "forwarder_request_duration_seconds_count") for f in sidecars)
        self.hop_throttled = sum(request_count(f, "forwarder_throttled_total") for f in sidecars)
        self.central_cpu = sum(cpu_seconds(c.pid) for c in centrals)
        self.sidecar_cpu = self_cpu()


async def run(m: int, chained: bool, args: argparse.Namespace, logdir: Path) -> Result:
    """One run: emulator, central tier (chained), M sidecars, feed, measure, stop."""
    rate = args.load * args.quota * EVENTS_PER_CALL / m
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        emu = emulator(logdir, "--quota", str(args.quota), core=None,
                       name=f"emulator-{'chained' if chained else 'direct'}-{m}")
        await emu.launch(session)
        centrals: list[ForwarderProcess] = []
        sidecars: list[Forwarder] = []
        try:
            if chained:
                centrals = await start_centrals(session, logdir, emu, m, args.quota)
            for i in range(m):
                url = centrals[i % CENTRALS].url if chained else emu.url
                fwd = Forwarder(sidecar_config(i, url, chained, args.quota, logdir), credentials=(f"side-{i}", SECRET),
                                registry=CollectorRegistry(), process_metrics=False)
                await fwd.start()
                sidecars.append(fwd)
            gc.collect()
            gc.freeze()  # as `forwarder run` does: M forwarders' start-up objects out of the collector's way
            feeder = Feeder(sidecars, rate)
            t0 = time.monotonic()
            feeding = asyncio.create_task(feeder.run(t0 + args.duration))
            await asyncio.sleep(args.warmup)
            a = Snapshot(await emulator_stats(session, emu.url), sidecars, centrals, feeder.offered)
            wall_a = time.time()
            await feeding
            b = Snapshot(await emulator_stats(session, emu.url), sidecars, centrals, feeder.offered)
            wall_b = time.time()
            # Events fed in the window may still be on their way: give them the time they took at most.
            await asyncio.sleep(min(10.0, args.duration / 4))
            latencies = await recorded_latencies(session, emu.url, wall_a, wall_b)
        finally:
            for fwd in sidecars:
                await fwd.shutdown()
            for central in centrals:
                central.stop()
            emu.stop()
    seconds = b.t - a.t
    calls, throttled = b.calls - a.calls, b.throttled - a.throttled
    accepted, offered = b.accepted - a.accepted, b.offered - a.offered
    hop_calls = b.hop_calls - a.hop_calls
    return Result(
        topology="chained" if chained else "direct", sidecars=m, quota=args.quota, offered=offered / seconds,
        goodput=stats.ratio(accepted, offered), throttled=stats.ratio(throttled, calls),
        events_per_call=stats.ratio(accepted, calls - throttled), calls_per_s=calls / seconds,
        hop_throttled=stats.ratio(b.hop_throttled - a.hop_throttled, hop_calls) if chained else None,
        latency_p50=stats.percentile(latencies, 50), latency_p99=stats.percentile(latencies, 99),
        central_cpu=(b.central_cpu - a.central_cpu) / seconds if chained else None,
        sidecar_cpu=(b.sidecar_cpu - a.sidecar_cpu) / seconds)


def table(results: Sequence[Result]) -> str:
    head = ("M", "topology", "offered ev/s", "goodput", "throttled", "events/call", "calls/s", "429 from central",
            "latency p50", "latency p99", "central CPU", "sidecars CPU")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        cells = (str(r.sidecars), r.topology, f"{r.offered:,.0f}", f"{r.goodput:.3f}", f"{r.throttled:.1%}",
                 f"{r.events_per_call:.1f}", f"{r.calls_per_s:.1f}",
                 "" if r.hop_throttled is None else f"{r.hop_throttled:.1%}", f"{r.latency_p50:.2f} s",
                 f"{r.latency_p99:.2f} s", "" if r.central_cpu is None else f"{r.central_cpu:.2f} cores",
                 f"{r.sidecar_cpu:.2f} cores")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sidecars", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--quota", type=float, default=50.0, help="the emulator's account quota, calls/s")
    parser.add_argument("--load", type=float, default=0.8, help="offered events/s as a fraction of quota x 50")
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    configure_logging("critical")  # shutdown drops what the sidecars still hold: expected at the end of a run
    results = []
    with tempfile.TemporaryDirectory(prefix="chain-fleet-") as tmp:
        for m in args.sidecars:
            for chained in (False, True):
                result = asyncio.run(run(m, chained, args, Path(tmp)))
                print(json.dumps(asdict(result)), file=sys.stderr, flush=True)
                results.append(result)
    print(f"Q = {args.quota:g} calls/s, offered {args.load:g} x Q x {EVENTS_PER_CALL} events/s, "
          f"{args.duration:g} s runs, steady window from {args.warmup:g} s")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
