"""Intake throughput: the forwarder against a bare aiohttp handler, same load generator.

Both servers run side by side on the server core for the whole comparison; the
load alternates between them (A, B, A, B, ...). The forwarder delivers what it
accepts to an emulator on the driver core, and its backlog is drained before
every window so neither side measures with the other's leftovers.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from functools import partial
from typing import Awaitable, Callable

from benchmarks import stats, workload, wrk
from benchmarks.context import Context
from benchmarks.procs import DRIVER_CORE, BareServer, emulator, forwarder, forwarder_sections, proc_counters, run_json
from benchmarks.report import Row, at_least
from forwarder.emulator.harness import EmulatorProcess

CONNECTIONS = 32
PATH = f"/events/projects/{workload.PROJECT}"


class Subject:
    """One side of a comparison: where to send, what to do before each window, its CPU and fault counters."""

    def __init__(self, name: str, url: str, before: Callable[[], Awaitable[object]] | None = None,
                 counters: Callable[[], tuple[float, float, int]] | None = None) -> None:
        self.name, self.url, self.before, self.counters = name, url, before, counters
        self.runs: list[dict] = []


async def load(ctx: Context, url: str, body: bytes, duration: float) -> dict:
    """One closed-loop window of CONNECTIONS keep-alive connections on the driver core."""
    if ctx.use_wrk:
        script = wrk.write_script(ctx.logdir / f"post-{len(body)}.lua", body)
        return await wrk.run(url, script, CONNECTIONS, duration, DRIVER_CORE)
    body_file = ctx.logdir / f"body-{len(body)}.json"
    body_file.write_bytes(body)
    return await run_json([sys.executable, "-m", "benchmarks.loadgen", "closed", "--url", url, "--body-file",
                           str(body_file), "--connections", str(CONNECTIONS), "--duration", str(duration)],
                          DRIVER_CORE, timeout=duration + 60)


async def settle(subjects: list[Subject]) -> None:
    """Every forwarder delivers its backlog first: a window must not pay for another's."""
    for s in subjects:
        if s.before:
            await s.before()


async def alternate(ctx: Context, subjects: list[Subject], body: bytes, rounds: int, duration: float) -> None:
    """Warm each side up once (not in a quick run), then measure A, B, A, B, ... ``rounds`` times."""
    for s in subjects if not ctx.quick else ():
        await settle(subjects)
        await load(ctx, s.url + PATH, body, 1.0)
    for _, name in stats.alternate([s.name for s in subjects], rounds):
        subject = next(s for s in subjects if s.name == name)
        await settle(subjects)
        c0 = subject.counters() if subject.counters else (0.0, 0.0, 0)
        run = await load(ctx, subject.url + PATH, body, duration)
        c1 = subject.counters() if subject.counters else (0.0, 0.0, 0)
        await settle([subject])  # so that its CPU includes delivering what it took
        if subject.counters:
            user, system, faults = (b - a for a, b in zip(c0, subject.counters()))
            requests = max(1, run["ok"])
            run["cpu_us_per_request"] = (user + system) / requests * 1e6
            run["sys_us_per_request"] = system / requests * 1e6
            run["faults_per_request"] = faults / requests
            run["core_share"] = (c1[0] + c1[1] - c0[0] - c0[1]) / run["seconds"]
        subject.runs.append(run)


def summary(s: Subject) -> dict[str, float]:
    return {k: stats.median([r[k] for r in s.runs]) for k in ("rps", "p50_ms", "p99_ms")}


def per_round(s: Subject) -> str:
    return ", ".join(f"{run['rps']:,.0f}" for run in s.runs)


def describe(m: dict[str, float], events: int) -> str:
    text = f"{m['rps']:,.0f} req/s"
    if events > 1:
        text += f" ({m['rps'] * events:,.0f} ev/s)"
    return text + f", p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms"


async def forwarder_pair(ctx: Context, stack: ExitStack, emu: EmulatorProcess, name: str,
                         loop: str | None, deliver: bool = True) -> Subject:
    sections = forwarder_sections(ctx.logdir, name, emu.url,
                                  **({} if deliver else {"buffer": {"max_events": 20_000_000, "max_bytes": 16 * 2**30}}))
    fwd = forwarder(ctx.logdir, sections, name=name, loop=loop)
    stack.callback(fwd.stop)
    await fwd.launch(ctx.session)
    counters = partial(proc_counters, fwd.pid)
    drain_timeout = ctx.pick(300.0, 60.0)
    if not deliver:  # Evidently is down: nothing to drain, the sender idles at its floor rate
        return Subject(name, fwd.url, None, counters)
    return Subject(name, fwd.url, lambda: fwd.wait_drained(ctx.session, drain_timeout), counters)


async def intake(ctx: Context, events_per_request: int, target: float, key: str, deliver: bool = True) -> list[Row]:
    """``deliver=False`` measures the intake stage alone: the emulator is down, so the
    forwarder only validates, encodes and buffers (delivery costs ~8 us per event
    on the same core, more than a bare single-event request's whole budget)."""
    rounds, duration = ctx.pick(5, 1), ctx.pick(4.0, 1.0)
    body = workload.body(workload.events(0, events_per_request))
    with ExitStack() as stack:
        emu = emulator(ctx.logdir, "--no-record", *(() if deliver else ("--down",)), name=f"emulator-{key}")
        stack.callback(emu.stop)
        await emu.launch(ctx.session)
        fwd = await forwarder_pair(ctx, stack, emu, f"forwarder-{key}", loop=None, deliver=deliver)
        bare = BareServer(ctx.logdir)
        stack.callback(bare.stop)
        await bare.launch(ctx.session)
        bare_s = Subject("bare", bare.url, counters=partial(proc_counters, bare.pid))
        low = BareServer(ctx.logdir, server="lowlevel")
        stack.callback(low.stop)
        await low.launch(ctx.session)
        low_s = Subject("bare-lowlevel", low.url, counters=partial(proc_counters, low.pid))
        await alternate(ctx, [fwd, bare_s, low_s], body, rounds, duration)
    f, b, lo = summary(fwd), summary(bare_s), summary(low_s)
    r = stats.ratio(f["rps"], b["rps"])
    errors = sum(run["errors"] for run in fwd.runs + bare_s.runs)
    fwd_cpu = stats.median([x["cpu_us_per_request"] for x in fwd.runs])
    bare_cpu = stats.median([x["cpu_us_per_request"] for x in bare_s.runs])
    notes = [
        f"requests/s per round, forwarder: {per_round(fwd)}; bare: {per_round(bare_s)}",
        f"server CPU per request (median): forwarder {fwd_cpu:.0f} us (intake and delivery of what it took), "
        f"bare {bare_cpu:.0f} us: by CPU the ratio is {stats.ratio(bare_cpu, fwd_cpu):.2f}, a figure less "
        "sensitive to other work on the machine than requests/s",
        "of that, system CPU and minor page faults per request (median): forwarder "
        f"{stats.median([x['sys_us_per_request'] for x in fwd.runs]):.0f} us, "
        f"{stats.median([x['faults_per_request'] for x in fwd.runs]):.1f} faults; bare "
        f"{stats.median([x['sys_us_per_request'] for x in bare_s.runs]):.0f} us, "
        f"{stats.median([x['faults_per_request'] for x in bare_s.runs]):.1f} faults (a buffer that grows touches "
        "new pages; each first touch is a fault, costly in a VM)",
        f"share of its core each server got during its windows (median): forwarder "
        f"{stats.median([x['core_share'] for x in fwd.runs]):.0%}, bare "
        f"{stats.median([x['core_share'] for x in bare_s.runs]):.0%} (below ~95%: other work on the machine)",
    ]
    low_cpu = stats.median([x["cpu_us_per_request"] for x in low_s.runs])
    notes.append(
        f"the stricter yardstick, the same bare handler on aiohttp's low-level web.Server (what the intake is "
        f"built on): {describe(lo, events_per_request)}, {low_cpu:.0f} us CPU per request; the forwarder makes "
        f"{stats.ratio(f['rps'], lo['rps']):.2f} of its requests/s")
    errors += sum(run["errors"] for run in low_s.runs)
    if errors:
        notes.append(f"{errors} non-2xx answers or socket errors across all windows")
    name = "intake, 1 event/POST" if events_per_request == 1 else f"intake, {events_per_request} events/POST"
    name += ", delivering in the same process" if deliver else ", intake alone (Evidently down)"
    return [Row(key, name, describe(f, events_per_request), "bare aiohttp " + describe(b, events_per_request),
                r, f">= {target}", at_least(r, target), notes)]


async def intake_single(ctx: Context) -> list[Row]:
    return await intake(ctx, 1, 0.85, "intake1")


async def intake_batch(ctx: Context) -> list[Row]:
    return await intake(ctx, 50, 0.55, "intake50")


async def intake_alone_single(ctx: Context) -> list[Row]:
    return await intake(ctx, 1, 0.85, "intake1-alone", deliver=False)


async def intake_alone_batch(ctx: Context) -> list[Row]:
    return await intake(ctx, 50, 0.55, "intake50-alone", deliver=False)


async def uvloop_intake(ctx: Context) -> list[Row]:
    """The same daemon on uvloop (``forwarder run``) and on the stock loop, single-event intake."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return [Row("uvloop", "uvloop vs asyncio, 1 event/POST intake", "uvloop not installed", "", None,
                    notes=["install the bench extra (pip install -e '.[bench]') to measure it"])]
    rounds, duration = ctx.pick(5, 1), ctx.pick(3.0, 1.0)
    body = workload.body(workload.events(0, 1))
    with ExitStack() as stack:
        emu = emulator(ctx.logdir, "--no-record", name="emulator-uvloop")
        stack.callback(emu.stop)
        await emu.launch(ctx.session)
        fast = await forwarder_pair(ctx, stack, emu, "forwarder-uvloop", loop=None)
        plain = await forwarder_pair(ctx, stack, emu, "forwarder-asyncio", loop="asyncio")
        await alternate(ctx, [fast, plain], body, rounds, duration)
    f, p = summary(fast), summary(plain)
    r = stats.ratio(f["rps"], p["rps"])
    return [Row("uvloop", "uvloop vs asyncio, 1 event/POST intake", "uvloop " + describe(f, 1),
                "asyncio " + describe(p, 1), r,
                notes=[f"requests/s per round, uvloop: {per_round(fast)}; asyncio: {per_round(plain)}",
                       "ratio is uvloop / asyncio requests/s: what the optional dependency buys the intake"])]
