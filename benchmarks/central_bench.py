"""The central tier at a whole account's quota: one core, TLS, each intake.auth, a disk buffer, many sidecars.

Seven ``forwarder run`` processes side by side on the server core, configured as
deploy/kubernetes/central/ deploys one (disk buffer, batches of 50, delivering to
an emulator that grants 1,000 calls/s, the big regions' quota) and differing in
one thing each, so that A/B differences split the CPU of a request:

    http        no TLS, intake.auth = none
    tls         TLS, none                 the unauthenticated baseline
    mtls        TLS, mtls (a client certificate, checked once per connection)
    sigv4       TLS, sigv4 (one request pre-signed per window and replayed, as benchmarks/auth_bench.py)
    token       TLS, token
    tls-memory  TLS, none, memory buffer  -> the disk buffer's commit: tls - tls-memory
    tls-down    TLS, none, Evidently down -> delivery: tls - tls-down

The load generator (benchmarks/sidecars_load.py, driver core) holds CONNECTIONS
keep-alive connections, like that many sidecars, each posting requests of 1, 5
or 50 events back to back. Windows alternate between the processes; after each
window the process delivers its backlog before the next one, so its CPU per
request includes delivering what it took (except tls-down). The window's CPU
starts once the load generator's connections are open: handshakes are a cost
per connection, reported apart (sidecars keep their connections for as long as
they send at least every intake.idle_timeout).

On a 2-core machine the load generator and the emulator share one core and
cannot saturate the other: the one-core capacity is therefore reported from the
server's CPU per request (1 / CPU per request, at a whole core), beside the rate
measured; the server's core share in the window says how far the load went.

    .venv/bin/python -m benchmarks --only central        (part of make bench)
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import timeit
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from benchmarks import pki as pki_mod
from benchmarks import stats, workload
from benchmarks.auth_bench import KEY, REGION, SECRET, TOKEN, sigv4_headers
from benchmarks.context import Context
from benchmarks.procs import DRIVER_CORE, ROOT, child_env, emulator, forwarder, pinned_to, proc_counters
from benchmarks.report import Row, at_least
from forwarder.emulator.harness import HOST, EmulatorProcess, ForwarderProcess, free_port, parse_metric
from forwarder.intake.auth import MtlsAuthenticator
from forwarder.observability import Metrics, Observer

CONNECTIONS = 256
QUOTA = 1000.0  # calls/s the emulator grants: us-east-1, us-west-2, eu-west-1
SIZES = (1, 5, 50)
PATH = f"/events/projects/{workload.PROJECT}"
EVENTS_TARGET = 50_000  # events/s on one core, 5-event requests, TLS and mTLS, disk buffer
MTLS_TARGET = 0.95  # of the unauthenticated (tls) rate


@dataclass(frozen=True)
class Variant:
    name: str
    tls: bool = True
    auth: str = "none"
    buffer: str = "disk"
    deliver: bool = True


VARIANTS = (Variant("http", tls=False), Variant("tls"), Variant("mtls", auth="mtls"), Variant("sigv4", auth="sigv4"),
            Variant("token", auth="token"), Variant("tls-memory", buffer="memory"), Variant("tls-down", deliver=False))


class Central:
    """One running variant and the windows measured on it."""

    def __init__(self, variant: Variant, fwd: ForwarderProcess, trust: ssl.SSLContext) -> None:
        self.variant = variant
        self.fwd = fwd
        self.trust = trust
        self.runs: dict[int, list[dict[str, Any]]] = {size: [] for size in SIZES}

    def median(self, size: int, key: str) -> float:
        return stats.median([r[key] for r in self.runs[size]])


def sections(ctx: Context, variant: Variant, pki: pki_mod.Pki, emu: EmulatorProcess) -> dict[str, dict[str, Any]]:
    secrets = ctx.logdir / "central-secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "credentials").write_text(f"[bench]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
    (secrets / "tokens").write_text(TOKEN + "\n")
    intake: dict[str, Any] = {"host": HOST, "port": free_port(), "auth": variant.auth,
                              "max_connections": 4 * CONNECTIONS}
    if variant.tls:
        intake.update(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key))
    if variant.auth == "mtls":
        intake.update(tls_client_ca_file=str(pki.ca), tls_allowed_identities=[pki_mod.SIDECAR_IDENTITY])
    elif variant.auth == "sigv4":
        intake["credentials_file"] = str(secrets / "credentials")
    elif variant.auth == "token":
        intake["token_file"] = str(secrets / "tokens")
    state = ctx.logdir / f"central-{variant.name}-state"
    return {
        "intake": intake,
        # As deployed (configmap.yaml), with room for every window's backlog of tls-down.
        "buffer": {"type": variant.buffer, "path": str(state), "max_events": 50_000_000, "max_bytes": 32 * 2**30},
        "batch": {"max_events": 50, "flush_interval": 1.0},
        "evidently": {"endpoint_url": emu.url, "region": REGION, "concurrency": 8, "initial_rate": QUOTA,
                      "max_rate": QUOTA},
        "dead_letter": {"path": str(state / "dead-letter.ndjson")},
        "log": {"level": "warning"},
    }


async def start(ctx: Context, stack: ExitStack, variant: Variant, pki: pki_mod.Pki,
                emulators: dict[bool, EmulatorProcess]) -> Central:
    trust = ssl.create_default_context(cafile=str(pki.ca))
    fwd = forwarder(ctx.logdir, sections(ctx, variant, pki, emulators[variant.deliver]),
                    name=f"central-{variant.name}", tls=trust if variant.tls else None)
    stack.callback(fwd.stop)
    await fwd.launch(ctx.session)
    return Central(variant, fwd, trust)


def load_args(central: Central, pki: pki_mod.Pki, body_file: str, duration: float, connections: int) -> list[str]:
    url = central.fwd.url + PATH
    args = [sys.executable, "-m", "benchmarks.sidecars_load", "--url", url, "--body-file", body_file,
            "--connections", str(connections), "--duration", str(duration)]
    if central.variant.tls:
        args += ["--cafile", str(pki.ca)]
    if central.variant.auth == "mtls":
        args += ["--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    elif central.variant.auth == "sigv4":
        with open(body_file, "rb") as f:
            body = f.read()
        args += [f"--header={k}:{v}" for k, v in sigv4_headers(url, body).items()]
    elif central.variant.auth == "token":
        args += [f"--header=Authorization:Bearer {TOKEN}"]
    return args


async def oldest_ages(ctx: Context, central: Central, stop: asyncio.Event, into: list[float]) -> None:
    """forwarder_oldest_event_age_seconds every half second: how long the oldest event waits for Evidently."""
    while not stop.is_set():
        async with ctx.session.get(f"{central.fwd.url}/metrics", ssl=central.trust if central.variant.tls else None) as r:
            into.append(parse_metric(await r.text(), "forwarder_oldest_event_age_seconds"))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def run_load(args: list[str], on_connected: Callable[[], None], timeout: float) -> dict[str, Any]:
    """Run benchmarks/sidecars_load.py on the driver core: ``on_connected()`` at its first line, its last line back."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=child_env(), cwd=ROOT, preexec_fn=pinned_to(DRIVER_CORE))
    try:
        async with asyncio.timeout(timeout):
            first = await proc.stdout.readline()  # type: ignore[union-attr]
            if first:
                on_connected()
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"the load generator did not finish within {timeout} s") from None
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"the load generator exited with {proc.returncode}:\n{err.decode()[-3000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def window(ctx: Context, central: Central, pki: pki_mod.Pki, size: int, duration: float) -> None:
    body_file = ctx.logdir / f"central-body-{size}.json"
    body_file.write_bytes(workload.body(workload.events(0, size)))
    counters = partial(proc_counters, central.fwd.pid)
    ages: list[float] = []
    stop = asyncio.Event()
    connections = ctx.pick(CONNECTIONS, 32)
    before = counters()
    marks: list[tuple[float, float, int]] = []
    sampler = asyncio.create_task(oldest_ages(ctx, central, stop, ages)) if central.variant.deliver else None
    try:
        run = await run_load(load_args(central, pki, str(body_file), duration, connections),
                             lambda: marks.append(counters()), timeout=duration + 120)
    finally:
        stop.set()
        if sampler is not None:
            await sampler
    c0 = marks[0]  # the connections are open: what follows is the requests' work
    c1 = counters()
    if central.variant.deliver:
        await central.fwd.wait_drained(ctx.session, ctx.pick(300.0, 60.0))
    c2 = counters()
    requests = max(1, run["ok"])
    run["cpu_us_per_request"] = (c2[0] + c2[1] - c0[0] - c0[1]) / requests * 1e6
    run["core_share"] = (c1[0] + c1[1] - c0[0] - c0[1]) / run["seconds"]
    run["oldest_age_max"] = max(ages, default=float("nan"))
    # Server CPU from the load generator's start to its connections being open: the handshakes (and
    # the idle loop meanwhile), per connection.
    run["handshake_us"] = (c0[0] + c0[1] - before[0] - before[1]) / connections * 1e6
    central.runs[size].append(run)


async def central(ctx: Context) -> list[Row]:
    rounds, duration = ctx.pick(5, 1), ctx.pick(3.0, 1.0)
    pki = pki_mod.make(ctx.logdir / "central-pki")
    with ExitStack() as stack:
        emulators = {}
        for deliver, flags in ((True, ("--quota", str(QUOTA))), (False, ("--down",))):
            emu = emulator(ctx.logdir, "--no-record", *flags, name=f"emulator-central-{'up' if deliver else 'down'}")
            stack.callback(emu.stop)
            emulators[deliver] = await emu.launch(ctx.session)
        centrals = [await start(ctx, stack, v, pki, emulators) for v in VARIANTS]
        for size in ctx.pick(SIZES, (5,)):
            if not ctx.quick:  # one warm-up window each
                for c in centrals:
                    await window(ctx, c, pki, size, 1.0)
                    c.runs[size].clear()
            for _, name in stats.alternate([c.variant.name for c in centrals], rounds):
                await window(ctx, next(c for c in centrals if c.variant.name == name), pki, size, duration)
    return rows(centrals)


class _Transport:
    def get_extra_info(self, name: str) -> dict:
        return {"subjectAltName": (("URI", pki_mod.SIDECAR_IDENTITY),)}


class _Protocol:
    peer = None


class _Request:
    """What MtlsAuthenticator reads of a request: its connection's protocol and transport."""

    def __init__(self) -> None:
        self.protocol, self.transport, self.remote = _Protocol(), _Transport(), "127.0.0.1"


def mtls_check_ns() -> tuple[float, float]:
    """In-process: ns per request of intake.auth = "mtls" after a connection's first request, and of the first."""
    check = MtlsAuthenticator((pki_mod.SIDECAR_IDENTITY,), Observer(Metrics(process_collectors=False)))
    request = _Request()
    first = min(timeit.repeat(lambda: (setattr(request.protocol, "peer", None), check(request, b"")),  # type: ignore[func-returns-value]
                              number=20_000, repeat=5)) / 20_000 * 1e9
    later = min(timeit.repeat(lambda: check(request, b""), number=200_000, repeat=5)) / 200_000 * 1e9  # type: ignore[arg-type]
    return later, first


def capacity(c: Central, size: int) -> float:
    """Requests/s one whole core sustains for this variant, from its CPU per request."""
    return stats.ratio(1e6, c.median(size, "cpu_us_per_request"))


def rows(centrals: list[Central]) -> list[Row]:
    by = {c.variant.name: c for c in centrals}
    out = []
    for size in (size for size in SIZES if centrals[0].runs[size]):
        tls = by["tls"]
        for c in centrals:
            if c.variant.name in ("tls-memory", "tls-down"):
                continue
            out.append(throughput_row(c, tls, size))
        out.append(split_row(by, size))
    return out


def throughput_row(c: Central, tls: Central, size: int) -> Row:
    cap_rps = capacity(c, size)
    measured = c.median(size, "rps")
    events = min(cap_rps * size, QUOTA * 50)  # delivery cannot outrun the quota, whatever the intake takes
    base = capacity(tls, size)
    r = stats.ratio(cap_rps, base)
    errors = sum(run["errors"] for run in c.runs[size])
    name = c.variant.name
    if name == "mtls":
        target, passed = f">= {MTLS_TARGET} of tls", at_least(r, MTLS_TARGET)
    elif name in ("tls",) and size == 5:
        target, passed = f">= {EVENTS_TARGET:,} ev/s", at_least(events, EVENTS_TARGET)
    else:
        target, passed = "", None
    if name == "mtls" and size == 5:
        target += f"; >= {EVENTS_TARGET:,} ev/s"
        passed = bool(passed) and at_least(events, EVENTS_TARGET)
    per_round = ", ".join(f"{run['cpu_us_per_request']:.0f}" for run in c.runs[size])
    connect_ms = c.median(size, "connect_ms")
    notes = [
        f"measured: {measured:,.0f} req/s ({measured * size:,.0f} ev/s) from {c.runs[size][0]['connections']} "
        f"connections, p50 "
        f"{c.median(size, 'p50_ms'):.1f} ms, p99 {c.median(size, 'p99_ms'):.1f} ms, the server at "
        f"{c.median(size, 'core_share'):.2f} of its core (below 1: the load generator was the limit)",
        f"CPU per request, window and delivery of its backlog (median): {c.median(size, 'cpu_us_per_request'):.0f} us; "
        f"per round: {per_round} us",
        f"a new connection (TCP{', TLS' if c.variant.tls else ''} handshake, one at a time, not in the figures above): "
        f"{c.median(size, 'handshake_us'):.0f} us of server CPU, {connect_ms:.1f} ms for the client",
    ]
    if name == "mtls":
        later, first = mtls_check_ns()
        notes.append(f"the mtls check itself, in-process: {later:.0f} ns per request after a connection's first, "
                     f"{first / 1e3:.1f} us for the first (reading the certificate's identities); the rest of the "
                     "difference from tls is the machine's noise (compare the rounds)")
    if c.variant.deliver:
        notes.append(f"delivery latency: the oldest undelivered event's age, sampled every 0.5 s, at most "
                     f"{c.median(size, 'oldest_age_max'):.2f} s (median over windows); batch.flush_interval 1 s")
    if errors:
        notes.append(f"{errors} non-200 answers")
        passed = False if passed is not None else None
    figure = f"{cap_rps:,.0f} req/s = {events:,.0f} ev/s on one core"
    return Row("central", f"central tier, {size} ev/request, {describe(c.variant)}", figure,
               f"tls, auth none: {base:,.0f} req/s", r, target, passed, notes)


def describe(v: Variant) -> str:
    transport = "TLS" if v.tls else "plain HTTP"
    return f"{transport}, intake.auth = {v.auth}, {v.buffer} buffer"


def split_row(by: dict[str, Central], size: int) -> Row:
    cpu = {name: c.median(size, "cpu_us_per_request") for name, c in by.items()}
    tls_cost = cpu["tls"] - cpu["http"]
    commit = cpu["tls"] - cpu["tls-memory"]
    delivery = cpu["tls"] - cpu["tls-down"]
    rest = cpu["tls"] - tls_cost - commit - delivery
    auth = {a: cpu[a] - cpu["tls"] for a in ("mtls", "sigv4", "token")}
    figure = (f"TLS {tls_cost:.0f} us, buffer commit {commit:.0f} us, delivery {delivery:.0f} us, HTTP + validation "
              f"+ answer {rest:.0f} us; auth: mtls {auth['mtls']:+.0f}, sigv4 {auth['sigv4']:+.0f}, "
              f"token {auth['token']:+.0f} us")
    handshake = {name: c.median(size, "handshake_us") for name, c in by.items()}
    return Row("central", f"central tier, {size} ev/request: CPU per request split by A/B", figure,
               f"tls, auth none, disk: {cpu['tls']:.0f} us", None, "", None, [
                   f"and per new connection, apart (server CPU from the load generator's start until its "
                   f"{CONNECTIONS} connections are open, per connection): plain {handshake['http']:.0f} us, TLS "
                   f"{handshake['tls']:.0f} us, mTLS {handshake['mtls']:.0f} us (the client certificate verified, "
                   "its identities read once at the first POST)",
                   "TLS = tls - http; buffer commit = tls - tls-memory; delivery = tls - tls-down (Evidently down: "
                   "the events stay buffered); the rest = what the plain intake does (HTTP parsing, validation, "
                   "the answer, the event loop); auth = each scheme - tls. Differences of medians on a shared "
                   "machine: a few us either way is noise"])
