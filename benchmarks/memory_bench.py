"""Memory per buffered event: 200k events held while Evidently is down.

The forwarder's RSS after filling minus its RSS before, per event, against the
average raw JSON size of the events posted (~250 B, wire form). The emulator answers 503,
so every event stays in the process: in the buffer, or in the sender's retry
schedule, which is where they would be during a real outage.
"""

from __future__ import annotations

import asyncio

from benchmarks import workload
from benchmarks.context import Context
from benchmarks.procs import emulator, forwarder, forwarder_sections
from benchmarks.report import Row, at_most

TARGET = 2.0
PER_REQUEST = 50
SENDERS = 8
WARMUP_EVENTS = 1_000


async def fill(ctx: Context, url: str, start: int, n: int) -> float:
    """POST events [start, start + n) in 50-event requests; returns the total raw JSON size."""
    requests = iter(range(start, start + n, PER_REQUEST))
    raw_bytes = 0

    async def sender() -> None:
        nonlocal raw_bytes
        for first in requests:
            evs = workload.events(first, min(PER_REQUEST, start + n - first))
            raw_bytes += workload.raw_size(evs) * len(evs)
            async with ctx.session.post(f"{url}/events/projects/{workload.PROJECT}", data=workload.body(evs),
                                        headers={"Content-Type": "application/json"}) as r:
                if r.status != 200:
                    raise RuntimeError(f"memory fill: {r.status} {await r.text()}")

    await asyncio.gather(*(sender() for _ in range(SENDERS)))
    return raw_bytes


async def memory(ctx: Context) -> list[Row]:
    n, warmup = ctx.pick(200_000, 2_000), ctx.pick(WARMUP_EVENTS, 100)
    emu = await emulator(ctx.logdir, "--down", "--no-record", name="emulator-down").launch(ctx.session)
    sections = forwarder_sections(ctx.logdir, "forwarder-memory", emu.url,
                                  buffer={"max_events": n + warmup + 1000},
                                  evidently={"max_rate": 0.0, "initial_rate": 0.0},  # region defaults
                                  log={"level": "error"})
    fwd = forwarder(ctx.logdir, sections, name="forwarder-memory")
    try:
        await fwd.launch(ctx.session)
        await fill(ctx, fwd.url, 0, warmup)  # code paths warmed: their allocations are not per event
        await asyncio.sleep(ctx.pick(1.0, 0.2))
        before = fwd.rss()
        raw = await fill(ctx, fwd.url, warmup, n) / n
        depth = await fwd.metric(ctx.session, "forwarder_queue_depth")
        encoded = await fwd.metric(ctx.session, "forwarder_queue_bytes") / depth
        await asyncio.sleep(ctx.pick(2.0, 0.2))  # let the sender move batches into its retry schedule
        after = fwd.rss()
    finally:
        fwd.stop()
        emu.stop()
    if depth != n + warmup:
        raise RuntimeError(f"memory: {depth:.0f} events buffered, expected {n + warmup}")
    per_event = (after - before) / n
    r = per_event / raw
    return [Row("memory", f"memory per buffered event ({n // 1000}k)", f"{per_event:,.0f} B RSS/event",
                f"raw JSON {raw:,.0f} B/event", r, f"<= {TARGET:g}x", at_most(r, TARGET),
                [f"RSS {before / 2**20:,.1f} MiB before, {after / 2**20:,.1f} MiB after {n:,} events "
                 f"(Evidently down: the emulator answers 503); encoded size {encoded:,.0f} B/event "
                 f"(forwarder_queue_bytes / depth)"])]
