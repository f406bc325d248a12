"""Connection floods against a forwarder with a low open-file limit (issue 16, "Connection limits").

    python -m benchmarks.connection_limits [--nofile 1024] [--idle 5000] [--slowloris 500] [--quick]

A ``forwarder run`` process starts with RLIMIT_NOFILE lowered (``ulimit -n``);
this process opens ``idle`` connections that send nothing and ``slowloris``
connections that send a request head one header line per second, then a normal
client makes requests, each on a new connection, while the flood holds. It
reports whether the normal client was served and how fast (against the same
client before the flood: the baseline of the ratio), the forwarder's peak RSS
(VmHWM) against the bound its limits imply, and what the forwarder logged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp
import orjson

from benchmarks import stats, workload
from benchmarks.context import Context
from benchmarks.procs import (CPUS, DRIVER_CORE, ROOT, SERVER_CORE, child_env, emulator, forwarder, forwarder_sections,
                              pin_self, pinned_to, pinning)
from benchmarks.report import Row, at_most
from forwarder.intake.connections import ACCEPT_BATCH

TARGET_MS = 100.0  # a normal client's worst request under the flood
HEAD = b"POST /events/projects/bench HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def limited(nofile: int, core: int | None) -> Callable[[], None]:
    """A ``preexec_fn``: the child's open-file limit (soft and hard) and, when pinning, its core."""
    cpu = CPUS[core] if core is not None and pinning() else None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
    return apply


def peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory process ``pid`` has had, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def raise_own_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


@dataclass
class Flood:
    """Connections that hold a forwarder's slots: idle ones and slowloris ones."""

    port: int
    head_bytes: int = 0  # what each slowloris sends at once before trickling (large heads hold memory)
    opened: int = 0
    failed: int = 0
    closed_by_server: int = 0
    answered_408: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self, idle: int, slowloris: int, batch: int = 200) -> None:
        """Open every connection (``batch`` connects at a time), each then held by its own task."""
        kinds = [self._idle] * idle + [self._slowloris] * slowloris
        for i in range(0, len(kinds), batch):
            opened = await asyncio.gather(*(self._open() for _ in kinds[i:i + batch]))
            for kind, conn in zip(kinds[i:i + batch], opened):
                if conn is not None:
                    self.tasks.append(asyncio.create_task(kind(*conn)))

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 10)
        except (OSError, asyncio.TimeoutError):
            self.failed += 1
            return None
        self.opened += 1
        return conn

    async def _idle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
            self.closed_by_server += 1
        except OSError:
            self.closed_by_server += 1
        finally:
            writer.close()

    async def _slowloris(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            fill = b"".join(b"X-Fill-%d: %s\r\n" % (i, b"f" * 1000) for i in range(self.head_bytes // 1024))
            writer.write(HEAD + fill)
            i = 0
            while not reader.at_eof():
                try:
                    answer = await asyncio.wait_for(reader.read(4096), 1.0)
                except asyncio.TimeoutError:
                    writer.write(b"X-Slow-%d: %d\r\n" % (i, i))  # one more header line per second
                    i += 1
                    continue
                self.answered_408 += answer.startswith(b"HTTP/1.1 408")
                break
            self.closed_by_server += 1
        except OSError:
            self.closed_by_server += 1
        finally:
            writer.close()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def normal_requests(url: str, n: int, timeout: float = 30.0, until: asyncio.Task | None = None,
                          pace: float = 0.0) -> dict:
    """``n`` one-event POSTs (or more, until ``until`` is done), each on a new connection, ``pace`` s apart:
    latencies and statuses."""
    body = workload.body(workload.events(0, 1))
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        while len(latencies) < n or (until is not None and not until.done()):
            if pace:
                await asyncio.sleep(pace)
            started = time.perf_counter()
            try:
                async with s.post(f"{url}/events/projects/bench", data=body,
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    key = str(r.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                key = type(e).__name__
            latencies.append((time.perf_counter() - started) * 1e3)
            statuses[key] = statuses.get(key, 0) + 1
    return {"statuses": statuses, "served": statuses.get("200", 0), "p50_ms": stats.median(latencies),
            "p99_ms": stats.percentile(latencies, 99), "max_ms": max(latencies)}


def log_counts(text: str) -> dict[str, int]:
    """What the forwarder printed: lines, tracebacks, EMFILE mentions, and lines per event name."""
    events: dict[str, int] = {}
    for line in text.splitlines():
        m = re.search(r'"event": "([a-z_]+)"', line)
        if m:
            events[m.group(1)] = events.get(m.group(1), 0) + 1
    return {"lines": len(text.splitlines()), "tracebacks": text.count("Traceback"),
            "too_many_open_files": text.count("Too many open files"), **{f"event:{k}": v for k, v in events.items()}}


async def attack(port: int, idle: int, slowloris: int, head_bytes: int, hold: float) -> None:
    """The flood, in its own process (so that its work never delays the normal client's loop).

    Prints one JSON line when every connection is open, another when ``hold`` seconds have passed.
    """
    raise_own_file_limit(idle + slowloris + 512)
    started = time.monotonic()
    flood_ = Flood(port, head_bytes)
    await flood_.start(idle, slowloris)
    print(orjson.dumps({"opened": flood_.opened, "setup_seconds": round(time.monotonic() - started, 2)}).decode(),
          flush=True)
    await asyncio.sleep(max(0.0, hold - (time.monotonic() - started)))
    counts = {"opened": flood_.opened, "connect_failures": flood_.failed, "closed_by_server": flood_.closed_by_server,
              "slowloris_408": flood_.answered_408}
    await flood_.stop()
    print(orjson.dumps(counts).decode(), flush=True)


async def flood(logdir: Path, session: aiohttp.ClientSession, nofile: int, idle: int, slowloris: int,
                requests: int, hold: float, header_timeout: float = 10.0, emulator_url: str = "",
                head_bytes: int = 0) -> dict:
    """Start a limited forwarder; measure a normal client before, while and after a flood opens."""
    sections = forwarder_sections(logdir, "forwarder-flood", emulator_url or "http://127.0.0.1:9",
                                  intake={"header_timeout": header_timeout},
                                  log={"level": "info"}, shutdown={"drain_timeout": 1.0})
    fwd = forwarder(logdir, sections, name="forwarder-flood")
    fwd.preexec_fn = limited(nofile, SERVER_CORE)
    try:
        await fwd.launch(session)
        rss_before = fwd.rss()
        before = await normal_requests(fwd.url, requests)
        log_start = len(fwd.logs())
        started = time.monotonic()
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.connection_limits", "attack", "--port", str(sections["intake"]["port"]),
            "--idle", str(idle), "--slowloris", str(slowloris), "--head-bytes", str(head_bytes), "--hold", str(hold),
            stdout=asyncio.subprocess.PIPE, env=child_env(), cwd=ROOT, preexec_fn=pinned_to(DRIVER_CORE))
        try:
            assert attacker.stdout is not None
            opened = asyncio.create_task(attacker.stdout.readline())
            # While the flood opens (the forwarder evicting at its limit), a request every 10 ms.
            while_opening = await normal_requests(fwd.url, 1, until=opened, pace=0.01)
            setup = orjson.loads(await opened)
            during = await normal_requests(fwd.url, requests)
            counts = asyncio.create_task(attacker.stdout.readline())
            await asyncio.sleep(max(0.0, hold - (time.monotonic() - started) - 1.0))
            late = await normal_requests(fwd.url, requests)  # timeouts and the log's rate limit have had time
            fwd.check_alive()
            result = {
                "nofile": nofile, "idle": idle, "slowloris": slowloris, "head_bytes": head_bytes, **setup,
                "before": before, "while_opening": while_opening, "during": during, "late": late,
                "rss_before": rss_before, "peak_rss": peak_rss(fwd.pid),
                "connection_limit": await fwd.metric(session, "forwarder_intake_connection_limit"),
                "open_connections": await fwd.metric(session, "forwarder_intake_connections"),
                "closed": {reason: await fwd.metric(session, "forwarder_intake_connections_closed_total",
                                                    f'reason="{reason}"')
                           for reason in ("evicted", "refused", "header_timeout", "headers_too_large")},
                "log": log_counts(fwd.logs()[log_start:]),
            }
            result.update(orjson.loads(await asyncio.wait_for(counts, hold + 60)))
            result["flood_seconds"] = round(time.monotonic() - started, 1)
            return result
        finally:
            if attacker.returncode is None:
                attacker.kill()
            await attacker.wait()
    finally:
        fwd.stop()


def bound_bytes(result: dict, max_header_bytes: int = 32768, state: int = 16 * 1024) -> int:
    """The RSS the limits allow: start-up RSS + (limit + ACCEPT_BATCH) x (2 x max_header_bytes + state).

    A head in progress is held twice by aiohttp's parser (the raw bytes and the
    decoded strings of its complete lines); ``state`` is a connection's own
    objects (~9 KiB measured with idle connections); evicted connections are
    freed on the next loop iteration, so at most ACCEPT_BATCH of them linger.
    """
    connections = result["connection_limit"] + ACCEPT_BATCH
    return int(result["rss_before"] + connections * (2 * max_header_bytes + state))


async def connections(ctx: Context) -> list[Row]:
    """The suite's row: a normal client's latency under the flood against the same client before it."""
    nofile, idle, slowloris = 1024, ctx.pick(5000, 1000), ctx.pick(500, 100)
    with ExitStack() as stack:
        emu = emulator(ctx.logdir, "--no-record", name="emulator-flood")
        stack.callback(emu.stop)
        await emu.launch(ctx.session)
        r = await flood(ctx.logdir, ctx.session, nofile, idle, slowloris, requests=ctx.pick(100, 20),
                        hold=ctx.pick(30.0, 3.0), emulator_url=emu.url)
    phases = [r[k] for k in ("while_opening", "during", "late")]
    worst = max(p["p99_ms"] for p in phases)
    served = sum(p["served"] for p in phases)
    made = sum(sum(p["statuses"].values()) for p in phases)
    bound = bound_bytes(r)
    notes = [
        f"{idle:,} idle + {slowloris:,} slowloris connections against `ulimit -n {nofile}` "
        f"(connection limit {r['connection_limit']:.0f}); flood held {r['flood_seconds']} s",
        f"normal client, one new connection per request: {served} of {made} served; while the flood opened p99 "
        f"{r['while_opening']['p99_ms']:.1f} ms, once open p50 {r['during']['p50_ms']:.1f} ms, p99 "
        f"{r['during']['p99_ms']:.1f} ms, later p99 {r['late']['p99_ms']:.1f} ms; before it p99 "
        f"{r['before']['p99_ms']:.1f} ms",
        f"closed by the forwarder: {r['closed']}; peak RSS {r['peak_rss'] / 2**20:.0f} MiB against the bound "
        f"{bound / 2**20:.0f} MiB (start-up RSS + (limit + {ACCEPT_BATCH}) x (2 x max_header_bytes + 16 KiB))",
        f"forwarder log during the flood: {r['log']}",
    ]
    return [Row("connections", f"connection flood: {idle:,} idle + {slowloris:,} slowloris, ulimit -n {nofile}",
                f"normal client p99 {worst:.1f} ms, {served} served", f"before the flood p99 "
                f"{r['before']['p99_ms']:.1f} ms", stats.ratio(worst, r["before"]["p99_ms"]),
                f"p99 <= {TARGET_MS:.0f} ms, RSS <= bound",
                at_most(worst, TARGET_MS) and r["peak_rss"] <= bound and r["log"]["too_many_open_files"] == 0, notes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("run", "attack"), default="run",
                        help="run: the whole measurement; attack: only the flood (used by run)")
    parser.add_argument("--port", type=int, help="attack: the forwarder's port")
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--slowloris", type=int, default=500)
    parser.add_argument("--requests", type=int, default=100, help="normal requests in each phase")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds the flood is held")
    parser.add_argument("--head-bytes", type=int, default=0, help="request head each slowloris sends at once")
    parser.add_argument("--logdir", type=Path, default=ROOT / "benchmarks" / "out" / "connection_limits")
    args = parser.parse_args()
    if args.mode == "attack":
        asyncio.run(attack(args.port, args.idle, args.slowloris, args.head_bytes, args.hold))
        return
    args.logdir.mkdir(parents=True, exist_ok=True)
    pin_self(DRIVER_CORE)

    async def run() -> dict:
        async with aiohttp.ClientSession() as session:
            with ExitStack() as stack:
                emu = emulator(args.logdir, "--no-record", name="emulator-flood")
                stack.callback(emu.stop)
                await emu.launch(session)
                result = await flood(args.logdir, session, args.nofile, args.idle, args.slowloris, args.requests,
                                     args.hold, emulator_url=emu.url, head_bytes=args.head_bytes)
        result["rss_bound"] = bound_bytes(result)
        return result

    print(orjson.dumps(asyncio.run(run())).decode())


if __name__ == "__main__":
    main()
