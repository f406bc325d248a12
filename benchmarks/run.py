"""``python -m benchmarks [--quick] [--only NAME ...]``: run the suite, print the table, write RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

if __package__ in (None, ""):  # run as a script: benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from benchmarks import (auth_bench, central_bench, codec_bench, connection_limits, datagram_bench, direct_bench,
                        drain_bench, event_throttle_bench, intake_bench, latency_bench, machine, memory_bench, report,
                        sender_bench, wrk)
from benchmarks.context import Context
from benchmarks.procs import DRIVER_CORE, ROOT, SERVER_CORE, pin_self, pinning

Bench = Callable[[Context], Awaitable[list[report.Row]]]

BENCHMARKS: dict[str, Bench] = {
    "intake1": intake_bench.intake_single,
    "intake50": intake_bench.intake_batch,
    "intake1-alone": intake_bench.intake_alone_single,
    "intake50-alone": intake_bench.intake_alone_batch,
    "sender": sender_bench.sender,
    "memory": memory_bench.memory,
    "latency": latency_bench.latency,
    "direct": direct_bench.direct,
    "uvloop": lambda ctx: _both(ctx, intake_bench.uvloop_intake, sender_bench.uvloop_sender),
    "codec": codec_bench.codec,
    "drain": drain_bench.drain,
    "event-throttles": event_throttle_bench.event_throttles,
    "auth": auth_bench.auth,
    "connections": connection_limits.connections,
    "datagram": datagram_bench.datagram,
    "central": central_bench.central,
}


async def _both(ctx: Context, *benches: Bench) -> list[report.Row]:
    return [row for bench in benches for row in await bench(ctx)]


RESULTS = ROOT / "benchmarks" / "RESULTS.md"
LOGS = ROOT / "benchmarks" / "out" / "suite"


def method(use_wrk: bool) -> list[str]:
    cores = (f"server under test pinned to core {SERVER_CORE}; load generator, emulator and this orchestrator "
             f"pinned to core {DRIVER_CORE} (os.sched_setaffinity in the child before exec)"
             if pinning() else "no pinning (fewer than 2 usable cores)")
    gen = "wrk, 1 thread, 32 keep-alive connections, Lua POST script" if use_wrk else \
        "aiohttp load generator in its own process (wrk not installed), 32 keep-alive connections"
    return [
        f"Pinning: {cores}.",
        f"Load generator for intake: {gen}.",
        "Comparisons alternate A, B, A, B, ... over several rounds after one warm-up window each; figures "
        "are medians over rounds.",
        "The forwarder under test is `forwarder run` (uvloop when importable) with a memory buffer big enough "
        "for the run, evidently.max_rate = initial_rate = 100000 and concurrency 8, delivering to "
        "`forwarder emulator --no-record`; its backlog is drained before every window. Its CPU per request "
        "counts the window and the drain, so it includes delivering what it took.",
        "Intake targets compare a whole forwarder (validate, encode, buffer, and deliver on the same core: one "
        "event loop) with a handler that does nothing; with wrk the bare side is not limited by the load generator.",
        "Sender: each variant in its own process on the server core, the emulator on the driver core; `raw` "
        "signs every request with botocore's SigV4Auth and posts with aiohttp; `stock` is aiobotocore "
        "put_project_events with default settings except inject_host_prefix=False (needed for a local endpoint).",
        "Memory: `forwarder run` with the emulator `--down` (503), so every event stays in the process; RSS from "
        "/proc/PID/status after a warm-up and after the fill.",
        "Latency: a paced load generator (its own process); the emulator records `received_at`; the forwarder has "
        "batch.flush_interval = 1.0 and the limiter out of the way (max_rate 100000).",
        "App's wait: one process on the driver core calls boto3 (default config) per event against the emulator "
        "with --latency 0.03, then POSTs one event per request to the forwarder over keep-alive http.client, "
        "alternated per round.",
        "uvloop: `forwarder run` (uvloop) against the same `serve()` on the stock loop "
        "(benchmarks/plain_forwarder.py); the sender runs the in-process pipeline on either loop.",
        "Backlog drain: `forwarder run` (default concurrency and initial_rate) and `forwarder emulator --quota 200`; "
        "40,000 events posted while the emulator answers 503 for 15 s (or to a forwarder that is then stopped "
        "and restarted on its disk buffer); timed from recovery (or restart) until the emulator holds every event.",
        "Per-event throttles: `forwarder run` with its defaults (memory buffer, max_rate 1000) and the emulator "
        "with --throttle-event-rate 0, 0.01 or 0.05; under the quota (--quota 1000) a paced load of 300 POSTs/s "
        "of 1-10 events to 20 busy and 200 occasional projects for 30 s, goodput counted 2 s after the last POST, "
        "then drained and checked exactly once against the emulator's recording; above the quota (--quota 100) "
        "500-event POSTs at 1.3x what the quota carries for 20 s, figures after the first 2 s.",
        "intake.auth: three `forwarder run` (auth none, sigv4, token) with the emulator `--down`, alternated; "
        "sigv4 load is one request pre-signed by botocore before each window and replayed (valid for 5 minutes).",
        "Central tier: seven `forwarder run` on the server core (TLS or not, each intake.auth, disk or memory "
        "buffer, Evidently up at 1,000 calls/s or down), fed in turn by benchmarks/sidecars_load.py (256 "
        "keep-alive connections, requests of 1, 5 and 50 events); one-core capacity from the server's CPU per "
        "request; see benchmarks/central_bench.py.",
        f"Logs and configurations of the last run: {LOGS.relative_to(ROOT)}/.",
    ]


async def run(names: list[str], quick: bool, use_wrk: bool) -> list[report.Row]:
    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)
    rows: list[report.Row] = []
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        ctx = Context(session, LOGS, quick, use_wrk)
        for name in names:
            started = time.monotonic()
            print(f"== {name} ...", file=sys.stderr, flush=True)
            rows += await BENCHMARKS[name](ctx)
            print(f"== {name} done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds per benchmark (the smoke test)")
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "aiohttp"), default="auto",
                        help="intake load generator: wrk when installed (auto), or the aiohttp one")
    parser.add_argument("--out", type=Path, help="where to write the Markdown report "
                        f"(default {RESULTS.relative_to(ROOT)}; with --quick, {LOGS.relative_to(ROOT)}/RESULTS.md)")
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    description = machine.describe()
    pin_self(DRIVER_CORE)
    if args.loadgen == "wrk" and wrk.available() is None:
        parser.error("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and wrk.available() is not None)
    rows = asyncio.run(run(names, args.quick, use_wrk))
    description.append(("load average at end", machine.load_average()))
    print(report.table(rows))
    out = args.out or (LOGS / "RESULTS.md" if args.quick else RESULTS)
    title = "forwarder benchmarks" + (" (--quick: smoke run, figures not meaningful)" if args.quick else "")
    out.write_text(report.markdown(rows, description, method(use_wrk), title))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
