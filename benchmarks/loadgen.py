"""The Python load generator, run in its own process; prints one JSON line.

``closed``: N keep-alive connections, each posting the same body back to back
for a duration (the fallback when wrk is not installed; it saturates one core
well below wrk, so ratios measured with it are compressed).
``paced``: requests started on a fixed schedule (R/s), each event tagged
``"<run>/<request>:<index>"`` in its data, and the wall-clock time each POST returned
written to a file: the delivery-latency benchmark joins it with the emulator's
``received_at``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import orjson

from benchmarks import stats, workload
from benchmarks.bare_server import loop_factory

HEADERS = {"Content-Type": "application/json"}


async def closed(url: str, body: bytes, connections: int, duration: float,
                 extra_headers: dict[str, str] | None = None) -> dict:
    headers = {**HEADERS, **(extra_headers or {})}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        end = started + duration

        async def worker() -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                latencies.append(time.perf_counter() - t)
                statuses[r.status] = statuses.get(r.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    return {"requests": len(latencies), "ok": ok, "errors": len(latencies) - ok, "seconds": elapsed,
            "rps": ok / elapsed, "p50_ms": stats.percentile(latencies, 50) * 1e3,
            "p99_ms": stats.percentile(latencies, 99) * 1e3, "statuses": statuses}


async def paced(base_url: str, rate: float, events_per_request: int, projects: int, duration: float,
                connections: int, out: str, tag: str) -> dict:
    """Start request k at t0 + k/rate; record when each 200 came back."""
    total = int(rate * duration)
    acks: dict[int, float] = {}
    statuses: dict[int, int] = {}
    lateness: list[float] = []
    limit = asyncio.Semaphore(connections)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(k: int) -> None:
            evs = [workload.event(k * events_per_request + i, tag=f"{tag}/{k}:{i}") for i in range(events_per_request)]
            url = f"{base_url}/events/projects/{workload.PROJECT}-{k % projects}"
            body = workload.body(evs)
            async with limit:
                async with session.post(url, data=body, headers=HEADERS) as r:
                    await r.read()
                    returned = time.time()
            statuses[r.status] = statuses.get(r.status, 0) + 1
            if r.status == 200:
                acks[k] = returned

        t0 = time.perf_counter()
        tasks = []
        for k in range(total):
            delay = t0 + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lateness.append(max(0.0, -delay))
            tasks.append(asyncio.create_task(one(k)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    with open(out, "wb") as f:
        f.write(orjson.dumps({str(k): t for k, t in acks.items()}))
    return {"requests": total, "ok": len(acks), "events": len(acks) * events_per_request, "seconds": elapsed,
            "statuses": statuses, "start_late_p99_ms": stats.percentile(lateness, 99) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("closed")
    c.add_argument("--url", required=True)
    c.add_argument("--body-file", required=True)
    c.add_argument("--connections", type=int, default=32)
    c.add_argument("--duration", type=float, required=True)
    c.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="sent with every request (repeatable), e.g. a pre-signed Authorization")
    p = sub.add_parser("paced")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--projects", type=int, default=1)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="run", help="prefix of the event tags, unique per run")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
        if args.mode == "closed":
            with open(args.body_file, "rb") as f:
                headers = dict(h.split(":", 1) for h in args.header)
                result = runner.run(closed(args.url, f.read(), args.connections, args.duration, headers))
        else:
            result = runner.run(paced(args.url, args.rate, args.events, args.projects, args.duration,
                                      args.connections, args.out, args.tag))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
