"""What an application waits per event: a direct PutProjectEvents call with an AWS-like
30 ms round trip, against posting the event to the forwarder (which delivers it to
the same emulator). The app runs in its own process on the driver core.
"""

from __future__ import annotations

import sys

from benchmarks import stats
from benchmarks.context import Context
from benchmarks.procs import DRIVER_CORE, emulator, forwarder, forwarder_sections, run_json
from benchmarks.report import Row, at_most

ROUND_TRIP = 0.03
TARGET = 0.1


def describe(waits: list[float]) -> str:
    return f"p50 {stats.percentile(waits, 50) * 1e3:.2f} ms, p99 {stats.percentile(waits, 99) * 1e3:.2f} ms"


async def direct(ctx: Context) -> list[Row]:
    rounds, direct_calls, post_calls = ctx.pick(3, 1), ctx.pick(100, 10), ctx.pick(1000, 50)
    emu = await emulator(ctx.logdir, "--no-record", "--latency", str(ROUND_TRIP),
                         name="emulator-direct").launch(ctx.session)
    fwd = forwarder(ctx.logdir, forwarder_sections(ctx.logdir, "forwarder-direct", emu.url),
                    name="forwarder-direct")
    try:
        await fwd.launch(ctx.session)
        waits = await run_json([sys.executable, "-m", "benchmarks.direct_worker", "--emulator", emu.url,
                                "--forwarder", fwd.url, "--rounds", str(rounds), "--direct-calls",
                                str(direct_calls), "--post-calls", str(post_calls)], DRIVER_CORE, timeout=300)
        await fwd.wait_drained(ctx.session, 60)
    finally:
        fwd.stop()
        emu.stop()
    d, p, s = waits["direct"], waits["post"], waits["sdk_post"]
    r = stats.ratio(stats.median(p), stats.median(d))
    p99 = stats.ratio(stats.percentile(p, 99), stats.percentile(d, 99))
    return [
        Row("direct", "app's wait per event: POST to the forwarder", "POST " + describe(p),
            f"direct boto3 put_project_events ({ROUND_TRIP * 1e3:.0f} ms round trip) " + describe(d), r,
            f"<= {TARGET:g} (median)", at_most(r, TARGET),
            [f"{len(d)} direct calls, {len(p)} POSTs, alternated over {rounds} rounds; p99 ratio {p99:.3f}; "
             "POST over a keep-alive http.client connection, one event each, sequential"]),
        Row("direct", "app's wait per event: boto3 pointed at the forwarder", "boto3 -> forwarder " + describe(s),
            "direct boto3 " + describe(d), stats.ratio(stats.median(s), stats.median(d)),
            notes=["an app that keeps its SDK code and only changes endpoint_url: the SDK's own CPU per call "
                   "is most of the wait"]),
    ]
