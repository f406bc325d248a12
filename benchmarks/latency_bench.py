"""Delivery latency at a steady 5k events/s: from the intake's 200 to arrival at the emulator.

A paced load generator (its own process, driver core) records the wall-clock
time each POST returned; every event carries ``"<run>/<request>:<index>"`` in its
data, and the emulator (recording, driver core) stamps ``received_at`` when it
takes the call. Both clocks are this machine's ``time.time()``.
"""

from __future__ import annotations

import sys

import orjson

from benchmarks import stats
from benchmarks.context import Context
from benchmarks.procs import DRIVER_CORE, emulator, forwarder, forwarder_sections, run_json
from benchmarks.report import Row
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, emulator_events, wait_for

FLUSH_INTERVAL = 1.0
TARGET = FLUSH_INTERVAL + 0.100

# (tag, description, POST/s, events per POST, projects)
SHAPES = (
    ("onep", "100 POST/s x 50 events, 1 project", 100, 50, 1),
    ("manyp", "500 POST/s x 10 events over 250 projects (batches flush at their deadline)", 500, 10, 250),
)


async def measure(ctx: Context, emu: EmulatorProcess, fwd: ForwarderProcess, tag: str, rate: float, per_post: int,
                  projects: int, duration: float) -> dict:
    await emu.reset(ctx.session)
    acks_file = ctx.logdir / f"acks-{tag}.json"
    sent = await run_json([sys.executable, "-m", "benchmarks.loadgen", "paced", "--url", fwd.url, "--rate",
                           str(rate), "--events", str(per_post), "--projects", str(projects), "--duration",
                           str(duration), "--out", str(acks_file), "--tag", tag], DRIVER_CORE,
                          timeout=duration + 120)
    if sent["ok"] != sent["requests"]:
        raise RuntimeError(f"latency {tag}: {sent['requests'] - sent['ok']} POSTs failed: {sent['statuses']}")

    async def all_arrived() -> bool:
        return await emu.accepted(ctx.session) >= sent["events"]
    await wait_for(all_arrived, FLUSH_INTERVAL + 30, f"{sent['events']} events at the emulator")
    acks = {int(k): t for k, t in orjson.loads(acks_file.read_bytes()).items()}
    delivered = await emulator_events(ctx.session, emu.url)
    latencies = []
    for e in delivered:
        run, _, position = orjson.loads(e["data"])["bench"].partition("/")
        if run == tag:
            latencies.append(e["received_at"] - acks[int(position.partition(":")[0])])
    if len(latencies) != sent["events"]:
        raise RuntimeError(f"latency {tag}: {len(latencies)} tagged events arrived, {sent['events']} were sent")
    return {"p50": stats.percentile(latencies, 50), "p99": stats.percentile(latencies, 99),
            "max": max(latencies), "events": len(latencies), "late_ms": sent["start_late_p99_ms"],
            "seconds": sent["seconds"]}


async def latency(ctx: Context) -> list[Row]:
    duration = ctx.pick(10.0, 1.0)
    emu = await emulator(ctx.logdir, name="emulator-latency").launch(ctx.session)
    sections = forwarder_sections(ctx.logdir, "forwarder-latency", emu.url,
                                  batch={"flush_interval": FLUSH_INTERVAL})
    fwd = forwarder(ctx.logdir, sections, name="forwarder-latency")
    rows = []
    try:
        await fwd.launch(ctx.session)
        for tag, description, rate, per_post, projects in SHAPES:
            m = await measure(ctx, emu, fwd, tag, rate, per_post, projects, duration)
            rows.append(Row(
                "latency", f"delivery latency, 5k ev/s: {description}",
                f"p50 {m['p50'] * 1e3:,.0f} ms, p99 {m['p99'] * 1e3:,.0f} ms, max {m['max'] * 1e3:,.0f} ms",
                f"flush_interval {FLUSH_INTERVAL * 1e3:.0f} ms", m["p99"] / FLUSH_INTERVAL,
                f"p99 <= {TARGET * 1e3:.0f} ms", m["p99"] <= TARGET,
                [f"{m['events']:,} events over {m['seconds']:.1f} s; the load generator started its p99 request "
                 f"{m['late_ms']:.1f} ms behind schedule; ratio is p99 / flush_interval"]))
    finally:
        fwd.stop()
        emu.stop()
    return rows
