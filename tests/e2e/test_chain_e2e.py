"""Chaining, end to end: app -> sidecar forwarder -> central forwarder (intake.auth = "sigv4") -> emulator.

The sidecar's ``evidently.endpoint_url`` is the central forwarder's intake; it
signs with its own key pair from the standard AWS chain (here the
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables), which the central tier
holds in its credentials file. The central intake speaks TLS with a certificate
from a self-signed CA, which the sidecar trusts through AWS_CA_BUNDLE (as an AWS
SDK would); every link stays on 127.0.0.1.

Events are numbered in their ``data`` ({"i": n}) so each check reads "every
acknowledged n arrived, and how often".
"""

from __future__ import annotations

import asyncio
import copy
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from forwarder.config import BufferConfig
from forwarder.buffer.disk.buffer import DiskBuffer
from forwarder.evidently.events import encode_event
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, free_port, wait_for
from tests.tools import make_ca_and_server_pair
from tests import support

pytestmark = pytest.mark.e2e

REGION = "eu-west-1"
SIDECAR_KEY, SIDECAR_SECRET = "AKIDSIDECAR", "sidecar-secret"
PROJECTS = ("checkout", "search", "arn:aws:evidently:eu-west-1:123456789012:project/shop.cart")
TOTAL = 5000
CENTRAL_CONCURRENCY = 4


def central_sections(tmp_path: Path, emulator: EmulatorProcess, **buffer: Any) -> dict[str, dict[str, Any]]:
    creds = tmp_path / "central-credentials"
    creds.write_text(f"[sidecars]\naws_access_key_id = {SIDECAR_KEY}\naws_secret_access_key = {SIDECAR_SECRET}\n")
    creds.chmod(0o600)
    if not (tmp_path / "server.crt").exists():
        make_ca_and_server_pair(tmp_path)
    return {
        "intake": {"port": free_port(), "auth": "sigv4", "credentials_file": str(creds),
                   "tls_cert_file": str(tmp_path / "server.crt"), "tls_key_file": str(tmp_path / "server.key")},
        "evidently": {"endpoint_url": emulator.url, "region": REGION, "concurrency": CENTRAL_CONCURRENCY},
        "buffer": {"type": "disk", **buffer},
        "batch": {"flush_interval": 0.1},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.5},
    }


async def start_central(procs, session, tmp_path: Path, sections: dict) -> ForwarderProcess:
    """The central forwarder; the same sections again restart it on the same port and disk buffer."""
    trust = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    central = procs(ForwarderProcess(tmp_path, copy.deepcopy(sections), name="central", tls=trust))
    await central.ready(session)
    return central


def sidecar_process(tmp_path: Path, central: ForwarderProcess, **evidently: Any) -> ForwarderProcess:
    return ForwarderProcess(tmp_path, {
        "evidently": {"endpoint_url": central.url, "region": REGION, "initial_rate": 100.0, "max_rate": 400.0,
                      **evidently},
        "buffer": {"type": "disk"},
        "batch": {"flush_interval": 0.1},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.5},
    }, env={"AWS_ACCESS_KEY_ID": SIDECAR_KEY, "AWS_SECRET_ACCESS_KEY": SIDECAR_SECRET,
            "AWS_CA_BUNDLE": str(tmp_path / "ca.crt")}, name="sidecar")


async def start_sidecar(procs, session, tmp_path: Path, central: ForwarderProcess, **evidently: Any):
    sidecar = procs(sidecar_process(tmp_path, central, **evidently))
    await sidecar.ready(session)
    return sidecar


async def post_numbered(sidecar: ForwarderProcess, session: aiohttp.ClientSession, total: int) -> set[tuple[str, int]]:
    """``total`` events, 50 per request, round-robin over the projects; every request must get a 200."""
    acked: set[tuple[str, int]] = set()
    for n, start in enumerate(range(0, total, 50)):
        project = PROJECTS[n % len(PROJECTS)]
        status, body = await sidecar.post(session, project.replace("/", "%2F"),
                                          [{"data": {"i": i}} for i in range(start, start + 50)])
        assert status == 200, body
        acked.update((project, i) for i in range(start, start + 50))
    return acked


async def delivered_ids(emulator: EmulatorProcess, session) -> Counter:
    return Counter((e["project"], orjson.loads(e["data"])["i"]) for e in await emulator.events(session))


async def wait_delivered(emulator: EmulatorProcess, session, acked: set, timeout: float = 60.0) -> Counter:
    async def all_there() -> bool:
        return acked <= set(await delivered_ids(emulator, session))
    await wait_for(all_there, timeout, f"{len(acked)} acknowledged events at the emulator", interval=0.2)
    return await delivered_ids(emulator, session)


@pytest.fixture
async def emulator(tmp_path, procs, session) -> EmulatorProcess:
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    return emu


async def test_5000_events_over_3_projects_go_through_the_chain_exactly_once(tmp_path, procs, session, emulator):
    central = await start_central(procs, session, tmp_path, central_sections(tmp_path, emulator))
    sidecar = await start_sidecar(procs, session, tmp_path, central)
    acked = await post_numbered(sidecar, session, TOTAL)

    counts = await wait_delivered(emulator, session, acked)
    assert set(counts) == acked and set(counts.values()) == {1}
    assert await central.metric(session, "forwarder_events_received_total") == TOTAL
    assert await central.metric(session, "forwarder_intake_auth_refusals_total", 'reason="bad_signature"') == 0
    assert sidecar.dead_letters() == [] and central.dead_letters() == []


async def test_the_central_tier_killed_mid_stream_and_restarted_loses_nothing_acknowledged(
        tmp_path, procs, session, emulator):
    # Latency keeps the central tier's batches in flight, so the kill lands between "Evidently has them" and its ack.
    await emulator.configure(session, latency=0.03)
    sections = central_sections(tmp_path, emulator)
    central = await start_central(procs, session, tmp_path, sections)
    sidecar = await start_sidecar(procs, session, tmp_path, central)
    posting = asyncio.create_task(post_numbered(sidecar, session, TOTAL))

    async def midway() -> bool:
        return await central.metric(session, "forwarder_events_received_total") >= TOTAL // 3
    await wait_for(midway, 30.0, "a third of the events at the central tier")
    central.signal(9)
    assert await central.wait(10) == -9
    killed_at = time.monotonic()
    central = await start_central(procs, session, tmp_path, sections)
    restarted_after = time.monotonic() - killed_at
    acked = await asyncio.wait_for(posting, 60)

    counts = await wait_delivered(emulator, session, acked)
    assert acked - set(counts) == set()
    extra = sum(n - 1 for n in counts.values())
    resent_by_sidecar = await sidecar.metric(session, "forwarder_duplicates_total")
    print(f"central down {restarted_after:.2f}s; {len(acked)} acknowledged, all delivered; {extra} duplicates "
          f"(the sidecar resent {resent_by_sidecar:.0f} events whose answer the kill cut off)")
    # At least once: a duplicate is an event the sidecar resent after a cut-off answer, or one the central
    # tier had in flight to Evidently at the kill (at most its concurrency x 50).
    assert extra <= resent_by_sidecar + CENTRAL_CONCURRENCY * 50
    assert sidecar.dead_letters() == []


async def test_an_event_the_central_tier_refuses_comes_back_per_event_and_is_dead_lettered_by_the_sidecar(
        tmp_path, procs, session, emulator):
    # Sidecar and central tier validate alike, so the sidecar's own intake never lets such an event
    # through; a sidecar of another version could (a stricter rule on the central tier). Put it
    # straight into the sidecar's disk buffer, between two good events, before the sidecar starts.
    central = await start_central(procs, session, tmp_path, central_sections(tmp_path, emulator))
    sidecar = sidecar_process(tmp_path, central)
    buffer = DiskBuffer(BufferConfig(type="disk", path=str(tmp_path / "sidecar-state")),
                        support.observer())
    await buffer.open()
    good = [encode_event({"data": {"i": i}}, i, time.time()) for i in (0, 2)]
    bad = b'{"data":"not a JSON object","timestamp":1790000000,"type":"aws.evidently.custom"}'
    await buffer.append("checkout", [good[0], bad, good[1]], time.time())
    await buffer.close()
    procs(sidecar)
    await sidecar.ready(session)

    async def dead_lettered() -> bool:
        return len(sidecar.dead_letters()) == 1
    await wait_for(dead_lettered, 20.0, "the refused event in the sidecar's dead-letter file")
    (letter,) = sidecar.dead_letters()
    assert letter["errorCode"] == "ValidationException" and "data" in letter["errorMessage"]
    counts = await wait_delivered(emulator, session, {("checkout", 0), ("checkout", 2)})
    assert set(counts.values()) == {1}


async def test_a_full_central_buffer_answers_429_and_slows_the_sidecar_down_without_losing_events(
        tmp_path, procs, session, emulator):
    await emulator.configure(session, down=True)  # the central tier keeps what it takes, and fills up
    central = await start_central(procs, session, tmp_path,
                                  central_sections(tmp_path, emulator, max_events=300))
    sidecar = await start_sidecar(procs, session, tmp_path, central)
    acked = await post_numbered(sidecar, session, 1500)

    async def slowed() -> bool:
        throttled = await sidecar.metric(session, "forwarder_throttled_total")
        return throttled > 0 and await sidecar.metric(session, "forwarder_send_rate") < 100.0
    await wait_for(slowed, 30.0, "the sidecar throttled by the central tier's 429s and below its initial rate")
    assert await central.metric(session, "forwarder_events_rejected_total", 'reason="buffer_full"') > 0
    assert await central.metric(session, "forwarder_queue_depth") <= 300

    await emulator.configure(session, down=False)
    counts = await wait_delivered(emulator, session, acked)
    assert set(counts) == acked and set(counts.values()) == {1}  # a 429 is a clean refusal: nothing twice
    assert sidecar.dead_letters() == []
