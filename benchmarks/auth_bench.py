"""The price of intake.auth: single-event intake with ``sigv4`` and with ``token``, as ratios of ``none``.

Three ``forwarder run`` processes side by side on the server core, identical but
for ``intake.auth``; the load alternates between them (none, sigv4, token, ...),
and also sends each scheme's headers to the ``none`` intake, which ignores them:
what carrying credentials costs (more header bytes to read and parse) apart
from what checking them costs.
Evidently is down (the emulator answers 503), so each forwarder only
authenticates, validates, encodes and buffers: the ratio is the intake's own
price, not diluted by delivery.

The load generator replays one request per window. For ``sigv4`` it is signed
with botocore's SigV4Auth just before the window, with the Host the load
generator sends: a signed request verifies again within its 5-minute window (as
at AWS), so replaying it is valid traffic; the verifier's caches (the derived
signing key per day and scope, parsed Authorization headers keyed by all but
the signature, the last X-Amz-Date) serve a replay as they serve an SDK sending
a new signature per request, and nothing caches whole verifications.

    .venv/bin/python -m benchmarks --only auth        (part of make bench)
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from functools import partial
from typing import Callable

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from benchmarks import stats, workload, wrk
from benchmarks.context import Context
from benchmarks.intake_bench import CONNECTIONS, PATH, Subject, describe, per_round, summary
from benchmarks.procs import DRIVER_CORE, emulator, forwarder, forwarder_sections, proc_counters, run_json
from benchmarks.report import Row, at_least
from forwarder.emulator.harness import EmulatorProcess

REGION = "us-east-1"
KEY, SECRET = "AKIDBENCH", "bench-secret"
TOKEN = "bench-token-0123456789abcdef0123456789abcdef"
TARGETS = {"sigv4": 0.8, "token": 0.95}


def sigv4_headers(url: str, body: bytes) -> dict[str, str]:
    """Authorization and X-Amz-Date for one POST of ``body`` to ``url``, signed now."""
    request = AWSRequest("POST", url, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(KEY, SECRET), "evidently", REGION).add_auth(request)
    return {k: v for k, v in request.headers.items() if k in ("Authorization", "X-Amz-Date")}


async def load(ctx: Context, name: str, url: str, body: bytes, headers: dict[str, str], duration: float) -> dict:
    """One closed-loop window of CONNECTIONS keep-alive connections on the driver core."""
    if ctx.use_wrk:
        script = wrk.write_script(ctx.logdir / f"auth-{name}.lua", body, headers)
        return await wrk.run(url, script, CONNECTIONS, duration, DRIVER_CORE)
    body_file = ctx.logdir / "auth-body.json"
    body_file.write_bytes(body)
    args = [sys.executable, "-m", "benchmarks.loadgen", "closed", "--url", url, "--body-file", str(body_file),
            "--connections", str(CONNECTIONS), "--duration", str(duration)]
    for k, v in headers.items():
        args += ["--header", f"{k}:{v}"]
    return await run_json(args, DRIVER_CORE, timeout=duration + 60)


async def start(ctx: Context, stack: ExitStack, emu: EmulatorProcess, auth: str) -> Subject:
    secrets = ctx.logdir / "auth-secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "credentials").write_text(f"[bench]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
    (secrets / "tokens").write_text(TOKEN + "\n")
    intake = {"auth": auth, "credentials_file": str(secrets / "credentials"), "token_file": str(secrets / "tokens")}
    sections = forwarder_sections(ctx.logdir, f"forwarder-auth-{auth}", emu.url, intake=intake,
                                  evidently={"region": REGION},
                                  buffer={"max_events": 20_000_000, "max_bytes": 16 * 2**30})
    fwd = forwarder(ctx.logdir, sections, name=f"forwarder-auth-{auth}")
    stack.callback(fwd.stop)
    await fwd.launch(ctx.session)
    return Subject(auth, fwd.url, None, partial(proc_counters, fwd.pid))


def headers_for(auth: str) -> Callable[[str, bytes], dict[str, str]]:
    if auth == "sigv4":
        return sigv4_headers
    if auth == "token":
        return lambda url, body: {"Authorization": f"Bearer {TOKEN}"}
    return lambda url, body: {}


# The `none` intake also takes each scheme's headers (and ignores them): the
# price of carrying credentials apart from the price of checking them.
CARRYING = {"sigv4": "none, sent sigv4's headers", "token": "none, sent token's header"}


def scheme_of(name: str) -> str:
    return next((scheme for scheme, carrying in CARRYING.items() if carrying == name), name)


async def measure(ctx: Context, subject: Subject, body: bytes, duration: float) -> None:
    url = subject.url + PATH
    c0 = subject.counters()  # type: ignore[misc]
    run = await load(ctx, scheme_of(subject.name), url, body, headers_for(scheme_of(subject.name))(url, body),
                     duration)
    user, system, _ = (b - a for a, b in zip(c0, subject.counters()))  # type: ignore[misc]
    run["cpu_us_per_request"] = (user + system) / max(1, run["ok"]) * 1e6
    subject.runs.append(run)


async def auth(ctx: Context) -> list[Row]:
    rounds, duration = ctx.pick(9, 1), ctx.pick(4.0, 1.0)  # 9: the token's price is within a 5-round spread
    body = workload.body(workload.events(0, 1))
    with ExitStack() as stack:
        emu = emulator(ctx.logdir, "--no-record", "--down", name="emulator-auth")
        stack.callback(emu.stop)
        await emu.launch(ctx.session)
        subjects = [await start(ctx, stack, emu, a) for a in ("none", "sigv4", "token")]
        none = subjects[0]
        carrying = {scheme: Subject(name, none.url, None, none.counters) for scheme, name in CARRYING.items()}
        for s in subjects if not ctx.quick else ():  # one warm-up window each
            await load(ctx, s.name, s.url + PATH, body, headers_for(s.name)(s.url + PATH, body), 1.0)
        everyone = subjects + list(carrying.values())
        for _, name in stats.alternate([s.name for s in everyone], rounds):
            await measure(ctx, next(s for s in everyone if s.name == name), body, duration)
    base = summary(none)
    none_cpu = stats.median([r["cpu_us_per_request"] for r in none.runs])
    rows = []
    for s in subjects[1:]:
        m = summary(s)
        r = stats.ratio(m["rps"], base["rps"])
        cpu = stats.median([x["cpu_us_per_request"] for x in s.runs])
        errors = sum(run["errors"] for run in s.runs)
        carried = carrying[s.name]
        carried_cpu = stats.median([x["cpu_us_per_request"] for x in carried.runs])
        notes = [
            f"requests/s per round, {s.name}: {per_round(s)}; none: {per_round(none)}",
            f"server CPU per request (median): {s.name} {cpu:.0f} us, none {none_cpu:.0f} us: {cpu - none_cpu:.0f} us "
            f"in all; by CPU the ratio is {stats.ratio(none_cpu, cpu):.2f}",
            f"the same headers sent to the none intake, which ignores them: {summary(carried)['rps']:,.0f} req/s "
            f"({stats.ratio(summary(carried)['rps'], base['rps']):.2f} of none), {carried_cpu:.0f} us per request: "
            f"carrying the credentials costs {carried_cpu - none_cpu:.0f} us, checking them {cpu - carried_cpu:.0f} us",
        ]
        if s.name == "sigv4":
            notes.append("one pre-signed request replayed per window (valid within the 5-minute window); "
                         "see benchmarks/auth_bench.py for what the verifier caches")
        if errors:
            notes.append(f"{errors} non-2xx answers or socket errors (a refused request would count here)")
        rows.append(Row("auth", f"intake, 1 event/POST, intake.auth = {s.name}, intake alone (Evidently down)",
                        describe(m, 1), "intake.auth = none " + describe(base, 1), r, f">= {TARGETS[s.name]}",
                        at_least(r, TARGETS[s.name]) and errors == 0, notes))
    return rows
