"""The datagram intake (issue 15): one core carrying a whole account quota of single events.

``forwarder run`` pinned to the server core takes single events over its Unix
datagram socket from a paced sender (driver core) and delivers them to
``forwarder emulator --quota 1000`` (driver core): 50,000 events/s is the quota
(1000 calls/s x 50). Its CPU per event, intake and delivery, is compared with
the same process taking single-event POSTs, and with a floor measured in the
same run: a bare reader on the same loop (benchmarks/datagram_worker.py
``receive``) plus the raw signed sender (benchmarks/sender_worker.py ``raw``).

    .venv/bin/python -m benchmarks --only datagram         (part of make bench)
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from benchmarks import intake_bench, sender_bench, stats, workload
from benchmarks.context import Context
from benchmarks.procs import DRIVER_CORE, SERVER_CORE, Emulator, Forwarder, forwarder_sections, run_json
from benchmarks.report import Row, at_least, at_most
from tests.harness import wait_for

RATE = 50_000.0  # events/s: the quota of one account
QUOTA = 1000.0  # calls/s at the emulator
CORE_SHARE_TARGET = 0.9  # "with CPU to spare": at most this share of the core
OVERLOAD_QUOTA = 20.0  # calls/s in the overload run: 1,000 events/s delivered
OVERLOAD = 10.0  # offered / deliverable


def worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.datagram_worker", *args]


async def send(to: str, rate: float, duration: float, *flags: str) -> dict:
    return await run_json(worker("send", "--to", to, "--rate", str(rate), "--duration", str(duration), *flags),
                          DRIVER_CORE, timeout=duration + 120)


def socket_path(ctx: Context, name: str) -> str:
    # sun_path holds 108 bytes: the log directory may be deep, /tmp is not.
    path = Path("/tmp") / f"fwd-bench-{name}-{id(ctx):x}.sock"
    path.unlink(missing_ok=True)
    return str(path)


async def wait_delivered(ctx: Context, emulator: Emulator, n: int, timeout: float) -> float:
    """Wait until the emulator holds ``n`` events; returns when (perf_counter)."""
    async def all_there() -> bool:
        return await emulator.accepted(ctx.session) >= n
    await wait_for(all_there, timeout, f"{n} events at the emulator", interval=0.1)
    return time.perf_counter()


async def throughput(ctx: Context, emulator: Emulator, fwd: Forwarder, path: str, duration: float) -> dict:
    """One paced window at RATE; CPU and delivery counted until the emulator has every event."""
    before = await emulator.accepted(ctx.session)
    read_before = await fwd.metric(ctx.session, "forwarder_datagrams_received_total")
    drops_before = await fwd.metric(ctx.session, "forwarder_datagram_kernel_drops_total")
    c0, t0 = fwd.child.counters(), time.perf_counter()
    sent = await send(path, RATE, duration)
    window_end = time.perf_counter()
    delivered_in_window = await emulator.accepted(ctx.session) - before
    drops = await fwd.metric(ctx.session, "forwarder_datagram_kernel_drops_total") - drops_before
    read = await fwd.metric(ctx.session, "forwarder_datagrams_received_total") - read_before
    done = await wait_delivered(ctx, emulator, before + int(read), 60)
    c1 = fwd.child.counters()
    cpu = (c1[0] + c1[1]) - (c0[0] + c0[1])
    return {"sent": sent["sent"], "read": read, "kernel_drops": drops, "seconds": sent["seconds"],
            "behind_p99_ms": sent["behind_p99_ms"],
            "delivered_per_s": delivered_in_window / (window_end - t0), "tail_s": done - window_end,
            "cpu_us_per_event": cpu / sent["sent"] * 1e6, "core_share": cpu / (done - t0),
            "sys_us_per_event": (c1[1] - c0[1]) / sent["sent"] * 1e6}


async def http_single(ctx: Context, emulator: Emulator, fwd: Forwarder, duration: float) -> dict:
    """The same process taking single-event POSTs (closed loop), CPU counted until delivered."""
    before = await emulator.accepted(ctx.session)
    body = workload.body(workload.events(0, 1))
    c0 = fwd.child.counters()
    run = await intake_bench.load(ctx, fwd.url + intake_bench.PATH, body, duration)
    await wait_delivered(ctx, emulator, before + run["ok"], 60)
    c1 = fwd.child.counters()
    return {"rps": run["rps"], "cpu_us_per_event": ((c1[0] + c1[1]) - (c0[0] + c0[1])) / max(1, run["ok"]) * 1e6}


async def bare_receive(ctx: Context, how: str, duration: float) -> dict:
    path = socket_path(ctx, f"bare-{how}")
    receiver = asyncio.create_task(run_json(worker("receive", "--path", path, "--how", how), SERVER_CORE,
                                            timeout=duration + 120))

    async def bound() -> bool:
        if receiver.done():
            receiver.result()  # raises the worker's error
        return Path(path).exists()
    await wait_for(bound, 30, f"the bare receiver on {path}")
    sent = await send(path, RATE, duration)
    result = await receiver
    if result["datagrams"] != sent["sent"]:
        raise RuntimeError(f"bare receiver: {result['datagrams']} datagrams of {sent['sent']} sent")
    return result


def med(runs: list[dict], key: str) -> float:
    return stats.median([r[key] for r in runs])


async def datagram(ctx: Context) -> list[Row]:
    duration, rounds = ctx.pick(30.0, 2.0), ctx.pick(3, 1)
    emulator = await Emulator(ctx.logdir, "--no-record", "--quota", str(QUOTA),
                              name="emulator-datagram").start(ctx.session)
    path = socket_path(ctx, "forwarder")
    sections = forwarder_sections(ctx.logdir, "forwarder-datagram", emulator.url,
                                  intake={"datagram_socket": path},
                                  evidently={"max_rate": QUOTA, "initial_rate": QUOTA})
    fwd = Forwarder(ctx.logdir, sections, name="forwarder-datagram")
    try:
        await fwd.start(ctx.session)
        if not ctx.quick:  # warm-up: first-run costs out of the figures
            await throughput(ctx, emulator, fwd, path, 2.0)
            await http_single(ctx, emulator, fwd, 1.0)
        dgram = await throughput(ctx, emulator, fwd, path, duration)
        http = [await http_single(ctx, emulator, fwd, ctx.pick(5.0, 1.0)) for _ in range(rounds)]
    finally:
        fwd.stop()
        emulator.stop()
    floor_emulator = await Emulator(ctx.logdir, "--no-record", name="emulator-datagram-floor").start(ctx.session)
    try:
        raw = [await sender_bench.one(ctx, floor_emulator, "raw", ctx.pick(50_000, 2_000)) for _ in range(rounds)]
    finally:
        floor_emulator.stop()
    bare: dict[str, list[dict]] = {"drain": [], "protocol": []}
    for _, how in stats.alternate(list(bare), rounds):
        bare[how].append(await bare_receive(ctx, how, ctx.pick(5.0, 1.0)))
    floor = med(bare["drain"], "cpu_us_per_datagram") + med(raw, "cpu_us_per_event")
    http_cpu = med(http, "cpu_us_per_event")
    share = dgram["core_share"]
    return [
        Row("datagram", "datagram intake: 50k single events/s for "
            f"{duration:.0f} s on one core (Unix socket, quota {QUOTA:.0f} calls/s)",
            f"{dgram['delivered_per_s']:,.0f} ev/s delivered, {dgram['cpu_us_per_event']:.1f} us CPU/event, "
            f"{share:.0%} of the core", f"{RATE:,.0f} ev/s offered", dgram["delivered_per_s"] / RATE,
            f">= 0.98 and core <= {CORE_SHARE_TARGET:.0%}",
            at_least(dgram["delivered_per_s"] / RATE, 0.98) and at_most(share, CORE_SHARE_TARGET),
            [f"{dgram['sent']:,} events sent in {dgram['seconds']:.1f} s (sender p99 "
             f"{dgram['behind_p99_ms']:.1f} ms behind schedule); the last arrived {dgram['tail_s']:.2f} s after "
             f"the window; of the CPU per event {dgram['sys_us_per_event']:.1f} us is system time; core share "
             "counts the window and the tail"]),
        Row("datagram", "datagram vs HTTP single-event path, CPU per event (intake + delivery)",
            f"datagram {dgram['cpu_us_per_event']:.1f} us", f"POST 1 event {http_cpu:.1f} us",
            stats.ratio(dgram["cpu_us_per_event"], http_cpu), "",
            notes=[f"the same forwarder process; POSTs from the intake benchmark's load generator "
                   f"({intake_bench.CONNECTIONS} connections, closed loop, {med(http, 'rps'):,.0f} req/s); "
                   "ratio is datagram / HTTP CPU per event"]),
        Row("datagram", "datagram path vs its floor, CPU per event",
            f"forwarder {dgram['cpu_us_per_event']:.1f} us",
            f"floor {floor:.1f} us (bare reader {med(bare['drain'], 'cpu_us_per_datagram'):.1f} + raw signed "
            f"sender {med(raw, 'cpu_us_per_event'):.1f})", stats.ratio(dgram["cpu_us_per_event"], floor), "",
            notes=["floor: a reader on the same loop that drains the socket and keeps nothing, at the same "
                   "rate, plus aiohttp posting pre-encoded 50-event bodies signed with SigV4Auth; ratio is "
                   "forwarder / floor"]),
        Row("datagram", "receiving: drain until EAGAIN vs one callback per datagram",
            f"drain {med(bare['drain'], 'cpu_us_per_datagram'):.2f} us/datagram",
            f"DatagramProtocol {med(bare['protocol'], 'cpu_us_per_datagram'):.2f} us/datagram",
            stats.ratio(med(bare["protocol"], "cpu_us_per_datagram"), med(bare["drain"], "cpu_us_per_datagram")),
            notes=[f"bare readers on uvloop at {RATE:,.0f} datagrams/s, nothing kept; per round drain "
                   + ", ".join(f"{r['cpu_us_per_datagram']:.2f}" for r in bare["drain"]) + "; protocol "
                   + ", ".join(f"{r['cpu_us_per_datagram']:.2f}" for r in bare["protocol"])
                   + f"; datagrams per wake-up (drain) {med(bare['drain'], 'datagrams') / max(1.0, med(bare['drain'], 'wakeups')):.1f}; "
                   "ratio is protocol / drain"]),
    ]
