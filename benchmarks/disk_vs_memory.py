"""Intake throughput of the disk buffer (fsync="normal") as a ratio of the memory buffer.

Starts one emulator (``--no-record``) and, alternately, a memory-mode and a
disk-mode ``forwarder run`` subprocess; many concurrent clients post 10-event
requests for a few seconds to each, and the 200s per second are compared. The
full pipeline runs (the sender delivers to the emulator) in both modes, so the
disk figure includes reading and acknowledging rows, not only the commits.

Also reports each mode's forwarder CPU seconds per 1000 accepted events: on a
small, noisy machine where the load generator shares the cores, that ratio says
what the disk costs even when the wall-clock throughput is bounded elsewhere.

    .venv/bin/python benchmarks/disk_vs_memory.py [--rounds 3] [--seconds 4] [--clients 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.procs import cpu_seconds  # noqa: E402
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess  # noqa: E402


async def load(url: str, clients: int, seconds: float, per_request: int) -> int:
    """Events acknowledged (200) by the intake within ``seconds``."""
    body = orjson.dumps({"events": [{"data": {"user": "u-1", "action": "click", "n": i}}
                                    for i in range(per_request)]})
    headers = {"Content-Type": "application/json"}
    deadline = time.monotonic() + seconds
    accepted = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while time.monotonic() < deadline:
            async with session.post(f"{url}/events/projects/bench", data=body, headers=headers) as r:
                await r.read()
                if r.status == 200:
                    accepted += per_request

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return accepted


async def one_run(tmp: Path, emulator: EmulatorProcess, mode: str, n: int, args: argparse.Namespace,
                  session: aiohttp.ClientSession) -> tuple[float, float]:
    sections = {
        "evidently": {"endpoint_url": emulator.url, "max_rate": 5000.0, "initial_rate": 5000.0},
        "buffer": {"type": mode, "fsync": "normal", "max_events": 5_000_000, "max_bytes": 2_000_000_000},
        "log": {"level": "warning"},
    }
    fwd = ForwarderProcess(tmp, sections, name=f"{mode}-{n}")
    fwd.start()
    try:
        await fwd.ready(session)
        await load(fwd.url, args.clients, 0.5, args.events)  # warm up connections and code paths
        cpu0 = cpu_seconds(fwd.pid)
        started = time.monotonic()
        accepted = await load(fwd.url, args.clients, args.seconds, args.events)
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(fwd.pid) - cpu0
    finally:
        fwd.stop()
    return accepted / elapsed, cpu / accepted * 1000


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        emulator = EmulatorProcess(tmp, "--no-record")
        emulator.start()
        try:
            async with aiohttp.ClientSession() as session:
                await emulator.ready(session)
                ratios, cpu_ratios = [], []
                for n in range(args.rounds):
                    # Alternate which mode goes first, so a drift in machine load hits both.
                    order = ("memory", "disk") if n % 2 == 0 else ("disk", "memory")
                    result = {}
                    for mode in order:
                        result[mode] = await one_run(tmp, emulator, mode, n, args, session)
                        print(f"round {n}: {mode:6s} {result[mode][0]:8.0f} events/s  "
                              f"{result[mode][1]:.3f} CPU s per 1000 events", flush=True)
                    ratios.append(result["disk"][0] / result["memory"][0])
                    cpu_ratios.append(result["memory"][1] / result["disk"][1])
        finally:
            emulator.stop()
    print(f"disk/memory throughput ratio: median {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"memory/disk CPU-per-event ratio: median {statistics.median(cpu_ratios):.2f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in cpu_ratios)})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--events", type=int, default=10, help="events per request")
    asyncio.run(main(parser.parse_args()))
