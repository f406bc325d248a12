"""The datagram intake (issue 15): one core carrying a whole account quota of single events.

``forwarder run`` pinned to the server core takes single events over its Unix
datagram socket from a paced sender (driver core) and delivers them to
``forwarder emulator --quota 1000`` (driver core): 50,000 events/s is the quota
(1000 calls/s x 50). Its CPU per event, intake and delivery, is compared with
the same process taking single-event POSTs, and with a floor measured in the
same run: a bare reader on the same loop (benchmarks/datagram_worker.py
``receive``) plus the raw signed sender (benchmarks/sender_worker.py ``raw``).

A Unix datagram socket queues at most ``net.unix.max_dgram_qlen`` datagrams
(the kernel's default is 10, systemd sets 512). The throughput row runs at the
machine's setting and, when this process may change it (root) and it is below
512, once more at 512, the setting restored afterwards.

    .venv/bin/python -m benchmarks --only datagram         (part of make bench)
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator

from benchmarks import intake_bench, sender_bench, stats, workload
from benchmarks.context import Context
from benchmarks import procs
from benchmarks.procs import DRIVER_CORE, SERVER_CORE, forwarder_sections, run_json
from forwarder.emulator.harness import EmulatorProcess as Emulator, ForwarderProcess as Forwarder
from benchmarks.report import Row, at_least, at_most
from forwarder.emulator.harness import free_port, wait_for

RATE = 50_000.0  # events/s: the quota of one account
QUOTA = 1000.0  # calls/s at the emulator
CORE_SHARE_TARGET = 0.9  # "with CPU to spare": at most this share of the core
QLEN = Path("/proc/sys/net/unix/max_dgram_qlen")
SYSTEMD_QLEN = 512
OVERLOAD_QUOTA = 20.0  # calls/s in the overload run: 1,000 events/s deliverable
OVERLOAD = 10.0  # offered / deliverable
OVERLOAD_BUFFER = 5_000  # events: full within seconds at 10x
RCVBUFS = (212_992, 4_194_304)  # Linux's default SO_RCVBUF, and the intake's default request


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


def queue_length() -> int | None:
    try:
        return int(QLEN.read_text())
    except OSError:
        return None


@contextlib.contextmanager
def unix_queue(length: int) -> Iterator[bool]:
    """``net.unix.max_dgram_qlen`` raised to ``length`` for the block, if allowed; yields whether it is."""
    before = queue_length()
    if before is None or before >= length:
        yield before is not None
        return
    try:
        QLEN.write_text(str(length))
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        QLEN.write_text(str(before))


async def wait_delivered(ctx: Context, emulator: Emulator, n: float, timeout: float) -> float:
    """Wait until the emulator holds ``n`` events; returns when (perf_counter)."""
    async def all_there() -> bool:
        return await emulator.accepted(ctx.session) >= n
    await wait_for(all_there, timeout, f"{n:.0f} events at the emulator", interval=0.1)
    return time.perf_counter()


async def throughput(ctx: Context, emulator: Emulator, fwd: Forwarder, to: str, duration: float,
                     rate: float = RATE, *flags: str) -> dict:
    """One paced window; CPU and delivery counted until the emulator has every event the forwarder read."""
    before = await emulator.accepted(ctx.session)
    read_before = await fwd.metric(ctx.session, "forwarder_datagrams_received_total")
    udp = to.startswith("udp:")  # kernel drops are a UDP series; a Unix socket never drops

    async def kernel_drops() -> float:
        return await fwd.metric(ctx.session, "forwarder_datagram_kernel_drops_total") if udp else 0.0
    drops_before = await kernel_drops()
    c0, t0 = procs.proc_counters(fwd.pid), time.perf_counter()
    sent = await send(to, rate, duration, *flags)
    window_end = time.perf_counter()
    delivered_in_window = await emulator.accepted(ctx.session) - before
    drops = await kernel_drops() - drops_before
    read = await fwd.metric(ctx.session, "forwarder_datagrams_received_total") - read_before
    done = await wait_delivered(ctx, emulator, before + read, 120)
    c1 = procs.proc_counters(fwd.pid)
    cpu = (c1[0] + c1[1]) - (c0[0] + c0[1])
    return {"sent": sent["sent"], "read": read, "kernel_drops": drops, "seconds": sent["seconds"],
            "sent_per_s": sent["rate"], "behind_p99_ms": sent["behind_p99_ms"],
            "delivered_per_s": delivered_in_window / (window_end - t0), "tail_s": done - window_end,
            "cpu_us_per_event": cpu / max(1.0, read) * 1e6, "core_share": cpu / (done - t0),
            "sys_us_per_event": (c1[1] - c0[1]) / max(1.0, read) * 1e6}


async def http_single(ctx: Context, emulator: Emulator, fwd: Forwarder, duration: float) -> dict:
    """The same process taking single-event POSTs (closed loop), CPU counted until delivered."""
    before = await emulator.accepted(ctx.session)
    body = workload.body(workload.events(0, 1))
    c0 = procs.proc_counters(fwd.pid)
    run = await intake_bench.load(ctx, fwd.url + intake_bench.PATH, body, duration)
    await wait_delivered(ctx, emulator, before + run["ok"], 120)
    c1 = procs.proc_counters(fwd.pid)
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


async def start(ctx: Context, emulator: Emulator, name: str, **overrides: dict) -> tuple[Forwarder, str]:
    path = socket_path(ctx, name)
    intake = {"datagram_socket": path, **overrides.pop("intake", {})}
    evidently = {"max_rate": QUOTA, "initial_rate": QUOTA, **overrides.pop("evidently", {})}
    sections = forwarder_sections(ctx.logdir, name, emulator.url, intake=intake, evidently=evidently, **overrides)
    fwd = procs.forwarder(ctx.logdir, sections, name=name)
    await fwd.launch(ctx.session)
    return fwd, path


def throughput_row(m: dict, duration: float, qlen: int | None) -> Row:
    share = m["core_share"]
    ratio = m["delivered_per_s"] / RATE
    return Row("datagram", f"datagram intake: 50k single events/s for {duration:.0f} s on one core "
               f"(Unix socket, max_dgram_qlen {qlen}, quota {QUOTA:.0f} calls/s)",
               f"{m['delivered_per_s']:,.0f} ev/s delivered, {m['cpu_us_per_event']:.1f} us CPU/event, "
               f"{share:.0%} of the core", f"{RATE:,.0f} ev/s offered", ratio,
               f">= 0.98 and core <= {CORE_SHARE_TARGET:.0%}",
               at_least(ratio, 0.98) and at_most(share, CORE_SHARE_TARGET),
               [f"{m['sent']:,} events sent in {m['seconds']:.1f} s ({m['sent_per_s']:,.0f}/s; the sender's p99 "
                f"lateness {m['behind_p99_ms']:.1f} ms: a blocking sendto waits while the queue is full); the last "
                f"arrived {m['tail_s']:.2f} s after the window; {m['sys_us_per_event']:.1f} us of the CPU per "
                "event is system time; the core share counts the window and the tail"])


async def main_rows(ctx: Context, duration: float, rounds: int) -> tuple[list[Row], dict, dict]:
    """The throughput rows, the HTTP comparison and the application's cost, on one emulator."""
    rows: list[Row] = []
    host_qlen = queue_length()
    emulator = await procs.emulator(ctx.logdir, "--no-record", "--quota", str(QUOTA),
                              name="emulator-datagram").launch(ctx.session)
    try:
        fwd, path = await start(ctx, emulator, "forwarder-datagram")
        try:
            if not ctx.quick:  # warm-up: first-run costs out of the figures
                await throughput(ctx, emulator, fwd, path, 2.0)
                await http_single(ctx, emulator, fwd, 1.0)
            dgram = await throughput(ctx, emulator, fwd, path, duration)
            rows.append(throughput_row(dgram, duration, host_qlen))
            http = [await http_single(ctx, emulator, fwd, ctx.pick(5.0, 1.0)) for _ in range(rounds)]
            cost = await run_json(worker("app-cost", "--path", path, "--url", fwd.url, "--rounds", str(rounds),
                                         "--calls", str(ctx.pick(5000, 200))), DRIVER_CORE, timeout=300)
            await fwd.wait_drained(ctx.session, 120)
        finally:
            fwd.stop()
        with unix_queue(SYSTEMD_QLEN) as raised:
            if raised and queue_length() != host_qlen:
                fwd, path = await start(ctx, emulator, "forwarder-datagram-qlen")
                try:
                    if not ctx.quick:
                        await throughput(ctx, emulator, fwd, path, 2.0)
                    at512 = await throughput(ctx, emulator, fwd, path, duration)
                    rows.append(throughput_row(at512, duration, queue_length()))
                    rows[-1].notes.append(f"net.unix.max_dgram_qlen raised to {SYSTEMD_QLEN} for this run only "
                                          "(systemd's default), restored afterwards")
                finally:
                    fwd.stop()
    finally:
        emulator.stop()
    return rows, {"dgram": dgram, "http": http}, cost


async def overload(ctx: Context, when_full: str, duration: float) -> dict:
    """OVERLOAD x what the emulator's quota lets through, from a non-blocking sender (EAGAIN: not taken)."""
    emulator = await procs.emulator(ctx.logdir, "--no-record", "--quota", str(OVERLOAD_QUOTA),
                              name=f"emulator-overload-{when_full}").launch(ctx.session)
    try:
        fwd, path = await start(ctx, emulator, f"forwarder-overload-{when_full}",
                                buffer={"max_events": OVERLOAD_BUFFER, "when_full": when_full},
                                evidently={"max_rate": OVERLOAD_QUOTA, "initial_rate": OVERLOAD_QUOTA})
        try:
            offered = OVERLOAD * OVERLOAD_QUOTA * 50
            sent = await send(path, offered, duration, "--nonblocking")
            dropped = await fwd.metric(ctx.session, 'forwarder_events_dropped_total{reason="buffer_full"}')
            await fwd.wait_drained(ctx.session, OVERLOAD_BUFFER / (OVERLOAD_QUOTA * 50) * 3 + 30)
            dropped = await fwd.metric(ctx.session, 'forwarder_events_dropped_total{reason="buffer_full"}')
            rejected = sum([await fwd.metric(ctx.session, f'forwarder_datagram_rejected_total{{reason="{r}"}}')
                            for r in ("not_json", "truncated", "oversized", "invalid_event", "missing_project",
                                      "invalid_project")])
            delivered = await emulator.accepted(ctx.session)
            duplicates = await fwd.metric(ctx.session, "forwarder_duplicates_total")
        finally:
            fwd.stop()
    finally:
        emulator.stop()
    lost = sent["sent"] - (delivered - duplicates) - dropped - rejected
    return {**sent, "delivered": delivered, "dropped": dropped, "rejected": rejected, "lost": lost,
            "offered_per_s": offered}


async def udp_buffer_drops(ctx: Context, duration: float) -> dict[int, dict]:
    """Kernel drops at RATE over UDP for each SO_RCVBUF, the two forwarders alternated."""
    emulator = await procs.emulator(ctx.logdir, "--no-record", name="emulator-udp").launch(ctx.session)
    out: dict[int, dict] = {}
    forwarders = []
    try:
        for rcvbuf in RCVBUFS:
            port = free_port()
            fwd, _ = await start(ctx, emulator, f"forwarder-udp-{rcvbuf}",
                                 intake={"datagram_port": port, "datagram_rcvbuf": rcvbuf},
                                 evidently={"max_rate": 100_000.0, "initial_rate": 100_000.0})
            forwarders.append((rcvbuf, fwd, port))
        runs: dict[int, list[dict]] = {rcvbuf: [] for rcvbuf in RCVBUFS}
        for _, rcvbuf in stats.alternate(list(RCVBUFS), ctx.pick(2, 1)):
            _, fwd, port = next(f for f in forwarders if f[0] == rcvbuf)
            runs[rcvbuf].append(await throughput(ctx, emulator, fwd, f"udp:127.0.0.1:{port}", duration))
        for rcvbuf, rs in runs.items():
            sent = sum(r["sent"] for r in rs)
            drops = sum(r["kernel_drops"] for r in rs)
            out[rcvbuf] = {"sent": sent, "drops": drops, "cpu_us_per_event": med(rs, "cpu_us_per_event")}
    finally:
        for _, fwd, _ in forwarders:
            fwd.stop()
        emulator.stop()
    return out


async def datagram(ctx: Context) -> list[Row]:
    duration, rounds = ctx.pick(30.0, 2.0), ctx.pick(3, 1)
    rows, measured, cost = await main_rows(ctx, duration, rounds)
    dgram, http = measured["dgram"], measured["http"]
    floor_emulator = await procs.emulator(ctx.logdir, "--no-record",
                                          name="emulator-datagram-floor").launch(ctx.session)
    try:
        raw = [await sender_bench.one(ctx, floor_emulator, "raw", ctx.pick(50_000, 2_000)) for _ in range(rounds)]
    finally:
        floor_emulator.stop()
    bare: dict[str, list[dict]] = {"drain": [], "protocol": []}
    for _, how in stats.alternate(list(bare), rounds):
        bare[how].append(await bare_receive(ctx, how, ctx.pick(5.0, 1.0)))
    floor = med(bare["drain"], "cpu_us_per_datagram") + med(raw, "cpu_us_per_event")
    http_cpu = med(http, "cpu_us_per_event")
    overloads = {w: await overload(ctx, w, ctx.pick(10.0, 2.0)) for w in ("reject", "drop_oldest")}
    udp = await udp_buffer_drops(ctx, ctx.pick(10.0, 1.0))
    s, p = cost["sendto"], cost["post"]
    rows += [
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
                   + "; datagrams per wake-up (drain) "
                   + f"{med(bare['drain'], 'datagrams') / max(1.0, med(bare['drain'], 'wakeups')):.1f}; "
                   "ratio is protocol / drain"]),
        Row("datagram", "app's cost per event: sendto vs POST",
            f"sendto p50 {s['p50_us']:.1f} us, p99 {s['p99_us']:.1f} us",
            f"POST p50 {p['p50_us']:.0f} us, p99 {p['p99_us']:.0f} us", stats.ratio(s["p50_us"], p["p50_us"]),
            notes=[f"{s['n']:,} sendto calls (blocking Unix datagram socket, unconnected, as in the README) and "
                   f"{p['n']:,} POSTs (keep-alive http.client, one event each) from one process on the driver "
                   "core, paced at 2,000/s and alternated per round; ratio is sendto / POST (p50)"]),
    ]
    lost = sum(o["lost"] for o in overloads.values())
    r, d = overloads["reject"], overloads["drop_oldest"]
    rows.append(Row(
        "datagram", f"{OVERLOAD:.0f}x overload on the Unix socket: events taken and not delivered or counted",
        f"{lost:,.0f} lost", f"reject: {r['sent']:,} taken, {r['eagain']:,} EAGAIN; drop_oldest: {d['sent']:,} "
        f"taken, {d['dropped']:,.0f} dropped", None, "== 0", lost == 0,
        [f"{w}: {o['offered_per_s']:,.0f} ev/s offered for {o['seconds']:.1f} s by a non-blocking sender against "
         f"{OVERLOAD_QUOTA * 50:,.0f} ev/s deliverable (emulator quota {OVERLOAD_QUOTA:.0f} calls/s) and a "
         f"{OVERLOAD_BUFFER:,}-event buffer: {o['sent']:,} taken by the socket, {o['eagain']:,} refused with "
         f"EAGAIN, {o['delivered']:,.0f} delivered, {o['dropped']:,.0f} dropped (buffer_full), "
         f"{o['rejected']:,.0f} rejected, {o['lost']:,.0f} lost" for w, o in overloads.items()]))
    small, large = (udp[b] for b in RCVBUFS)
    rows.append(Row(
        "datagram", f"UDP at {RATE / 1000:.0f}k ev/s: kernel drops by SO_RCVBUF",
        f"{RCVBUFS[1]:,} B asked: {large['drops'] / max(1, large['sent']):.2%} dropped",
        f"{RCVBUFS[0]:,} B (Linux default): {small['drops'] / max(1, small['sent']):.2%} dropped", None,
        notes=[f"{large['sent']:,} and {small['sent']:,} datagrams sent, {large['drops']:,.0f} and "
               f"{small['drops']:,.0f} dropped (forwarder_datagram_kernel_drops_total); the emulator without a "
               "quota; the kernel grants twice the size asked, capped by net.core.rmem_max"]))
    return rows
