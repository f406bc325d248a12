"""Sender throughput from a pre-filled buffer: the forwarder against a raw signed
aiohttp client and against stock aiobotocore, alternated, each in its own process
on the server core, all delivering to one ``forwarder emulator --no-record`` on
the driver core.
"""

from __future__ import annotations

import sys

from benchmarks import stats
from benchmarks.context import Context
from benchmarks.procs import SERVER_CORE, emulator, run_json
from forwarder.emulator.harness import EmulatorProcess
from benchmarks.report import Row, at_least

CONCURRENCY = 8
TARGET = 0.5
STRETCH_CALLS = 1000.0


async def one(ctx: Context, emu: EmulatorProcess, mode: str, events: int, loop: str = "uvloop") -> dict:
    before = await emu.accepted(ctx.session)
    result = await run_json([sys.executable, "-m", "benchmarks.sender_worker", mode, "--url", emu.url,
                             "--events", str(events), "--concurrency", str(CONCURRENCY), "--loop", loop],
                            SERVER_CORE, timeout=300)
    delivered = await emu.accepted(ctx.session) - before
    if delivered != result["events"]:
        raise RuntimeError(f"sender {mode}: the emulator accepted {delivered} events, expected {result['events']}")
    return result


def med(runs: list[dict], key: str) -> float:
    return stats.median([r[key] for r in runs])


def describe(runs: list[dict]) -> str:
    return (f"{med(runs, 'events_per_s'):,.0f} ev/s ({med(runs, 'calls_per_s'):,.0f} calls/s), "
            f"{med(runs, 'cpu_us_per_event'):.1f} us CPU/event")


def per_round(runs: list[dict]) -> str:
    return ", ".join(f"{r['events_per_s']:,.0f}" for r in runs)


async def sender(ctx: Context) -> list[Row]:
    rounds, events = ctx.pick(5, 1), ctx.pick(50_000, 2_000)
    modes = ("forwarder", "raw", "sdk")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    emu = await emulator(ctx.logdir, "--no-record", name="emulator-sender").launch(ctx.session)
    try:
        for mode in modes if not ctx.quick else ():  # warm-up: first-run costs out of the figures
            await one(ctx, emu, mode, min(events, 2_000))
        for _, mode in stats.alternate(modes, rounds):
            runs[mode].append(await one(ctx, emu, mode, events))
    finally:
        emu.stop()
    fwd, raw, sdk = runs["forwarder"], runs["raw"], runs["sdk"]
    r = stats.ratio(med(fwd, "events_per_s"), med(raw, "events_per_s"))
    calls = med(fwd, "calls_per_s")
    notes = [f"events/s per round ({events:,} events each, concurrency {CONCURRENCY}): forwarder {per_round(fwd)}; "
             f"raw {per_round(raw)}; stock aiobotocore {per_round(sdk)}",
             f"by CPU per event the forwarder/raw ratio is "
             f"{stats.ratio(med(raw, 'cpu_us_per_event'), med(fwd, 'cpu_us_per_event')):.2f} (less sensitive to "
             "other work on the machine than events/s, which also depends on the emulator keeping up)",
             "forwarder = the in-process pipeline (MemoryBuffer -> FlushLoop -> Sender -> EvidentlyClient) timed "
             "from N events appended at once until buffer depth is 0; CPU is the whole process's"]
    gain = stats.ratio(med(fwd, "events_per_s"), med(sdk, "events_per_s"))
    cpu_gain = stats.ratio(med(sdk, "cpu_us_per_event"), med(fwd, "cpu_us_per_event"))
    return [
        Row("sender", "sender, 50-event calls", "forwarder " + describe(fwd), "raw signed aiohttp " + describe(raw),
            r, f">= {TARGET}", at_least(r, TARGET), notes),
        Row("sender", "sender stretch: one process", f"{calls:,.0f} calls/s x 50 events", "", None,
            f">= {STRETCH_CALLS:.0f} calls/s", at_least(calls, STRETCH_CALLS)),
        Row("sender", "sender vs stock aiobotocore", "forwarder " + describe(fwd),
            "put_project_events (validation on, float timestamps) " + describe(sdk), gain,
            notes=[f"ratio is forwarder / stock events/s; stock costs {cpu_gain:.1f}x the CPU per event: "
                   "the figure behind client.py's pre-encoding and parameter_validation=False"]),
    ]


async def uvloop_sender(ctx: Context) -> list[Row]:
    """The in-process forwarder pipeline on uvloop and on the stock loop."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return [Row("uvloop", "uvloop vs asyncio, sender", "uvloop not installed", "", None)]
    rounds, events = ctx.pick(3, 1), ctx.pick(50_000, 2_000)
    runs: dict[str, list[dict]] = {"uvloop": [], "asyncio": []}
    emu = await emulator(ctx.logdir, "--no-record", name="emulator-uvloop-sender").launch(ctx.session)
    try:
        for _, loop in stats.alternate(list(runs), rounds):
            runs[loop].append(await one(ctx, emu, "forwarder", events, loop))
    finally:
        emu.stop()
    r = stats.ratio(med(runs["uvloop"], "events_per_s"), med(runs["asyncio"], "events_per_s"))
    return [Row("uvloop", "uvloop vs asyncio, sender", "uvloop " + describe(runs["uvloop"]),
                "asyncio " + describe(runs["asyncio"]), r, notes=["ratio is uvloop / asyncio events/s"])]
