"""A connection flood against a real ``forwarder run`` with a low open-file limit (issue 16, item 11).

The daemon starts with RLIMIT_NOFILE at 512 (``ulimit -n 512``); this test holds
far more idle and slowloris connections than that. A normal client must still
be served, the daemon must never run out of descriptors, and its log must not
flood. Latency is benchmarks/connection_limits.py's to measure, not this test's.
"""

from __future__ import annotations

import aiohttp
import pytest

from benchmarks.connection_limits import Flood, limited, normal_requests, raise_own_file_limit
from forwarder.intake.connections import ACCEPT_BATCH, FIXED_FILES
from forwarder.emulator.harness import ForwarderProcess, wait_for

pytestmark = pytest.mark.e2e

NOFILE = 512
CONCURRENCY = 4  # evidently.concurrency: the sender's connections come out of the same budget


@pytest.mark.timeout(180)
async def test_a_flood_of_idle_and_slowloris_connections_leaves_a_normal_client_served(tmp_path, procs, session):
    raise_own_file_limit(2500)
    fwd = procs(ForwarderProcess(tmp_path, {  # under ulimit -n NOFILE
        "intake": {"header_timeout": 2.0},
        "evidently": {"endpoint_url": "http://127.0.0.1:9", "concurrency": CONCURRENCY},
        "shutdown": {"drain_timeout": 0.5},
    }, preexec_fn=limited(NOFILE, None)))
    await fwd.ready(session)
    limit = await fwd.metric(session, "forwarder_intake_connection_limit")
    assert limit == NOFILE - FIXED_FILES - ACCEPT_BATCH - CONCURRENCY
    before = fwd.logs()

    flood = Flood(fwd.port)
    await flood.start(idle=1500, slowloris=150)
    try:
        assert flood.opened == 1650 and flood.failed == 0
        served = await normal_requests(fwd.url, 20, timeout=10)
        assert served["served"] == 20, served

        async def slowloris_timed_out() -> bool:
            return await fwd.metric(session, "forwarder_intake_connections_closed_total",
                                    'reason="header_timeout"') > 0
        await wait_for(slowloris_timed_out, 20, "slow heads closed by intake.header_timeout")
        assert (await normal_requests(fwd.url, 20, timeout=10))["served"] == 20
        assert await fwd.metric(session, "forwarder_intake_connections") <= limit
        evicted = await fwd.metric(session, "forwarder_intake_connections_closed_total", 'reason="evicted"')
        assert evicted >= 1650 - limit
    finally:
        await flood.stop()

    log = fwd.logs()[len(before):]
    assert "Too many open files" not in log and "Traceback" not in log
    # Rate-limited: a line per kind of closing per 10 s, however many connections were closed.
    connection_lines = [line for line in log.splitlines() if "connection_" in line]
    assert 1 <= len(connection_lines) <= 6, connection_lines
    async with aiohttp.ClientSession() as fresh, fresh.get(fwd.url + "/healthz") as r:
        assert r.status == 200
    fwd.terminate()
    assert await fwd.wait(15) == 0
