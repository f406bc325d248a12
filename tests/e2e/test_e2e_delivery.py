"""End to end, rate-limit-aware delivery: the real daemon against a faulty emulator process.

Each event's data is a JSON string with a unique ``id``, written by the test, so
the emulator's per-event faults (stable by data) and the dead-letter file can be
checked event by event: delivered + dead-lettered == sent, and none in both.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest

from forwarder.emulator.decisions import stable_fraction
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, wait_for

pytestmark = pytest.mark.e2e

DEAD_LETTER_FIELDS = {"project", "event", "eventId", "errorCode", "errorMessage", "attempts", "first_attempt_at",
                      "last_attempt_at"}


# --- helpers ---------------------------------------------------------------


def data(i: int, **extra) -> str:
    return orjson.dumps({"id": i, **extra}).decode()


def event_id(data_text: str) -> int:
    return orjson.loads(data_text)["id"]


def forwarder(tmp_path: Path, emu: EmulatorProcess, name: str = "forwarder", **sections) -> ForwarderProcess:
    config = {
        "evidently": {"endpoint_url": emu.url},
        "batch": {"flush_interval": 0.2, "max_events": 50},
        "retry": {"initial_backoff": 0.05, "max_backoff": 1.0},
        "shutdown": {"drain_timeout": 5.0},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return ForwarderProcess(tmp_path, config, name=name)


async def emulator(tmp_path: Path, procs, session: aiohttp.ClientSession, *flags: str) -> EmulatorProcess:
    emu = procs(EmulatorProcess(tmp_path, *flags))
    await emu.ready(session)
    return emu


async def post_all(session: aiohttp.ClientSession, fwd: ForwarderProcess, project: str, texts: list[str],
                   per_request: int = 500) -> None:
    for k in range(0, len(texts), per_request):
        status, answer = await fwd.post(session, project, [{"data": t} for t in texts[k:k + per_request]])
        assert (status, answer.get("failedEventCount")) == (200, 0), answer


async def settled(session: aiohttp.ClientSession, fwd: ForwarderProcess, n: int, timeout: float) -> None:
    """Wait until all ``n`` accepted events are delivered or dead-lettered (queue back at 0)."""
    async def done() -> bool:
        sent = await fwd.metric(session, "forwarder_events_sent_total")
        return sent + len(fwd.dead_letters()) >= n and await fwd.metric(session, "forwarder_queue_depth") == 0
    await wait_for(done, timeout, f"{n} events delivered or dead-lettered", interval=0.1)


async def delivered_ids(session: aiohttp.ClientSession, emu: EmulatorProcess, project: str | None = None) -> Counter:
    return Counter(event_id(e["data"]) for e in await emu.events(session, project))


def dead_letter_ids(fwd: ForwarderProcess) -> Counter:
    return Counter(event_id(line["event"]["data"]) for line in fwd.dead_letters())


# --- throttling ------------------------------------------------------------


async def test_a_10_rps_quota_is_found_by_the_limiter_with_few_throttles_and_nothing_lost(
        tmp_path, procs, session):
    emu = await emulator(tmp_path, procs, session, "--quota", "10")
    # max_rate and initial_rate stay at their defaults (1000 and 100): the limiter must find 10/s itself.
    fwd = procs(forwarder(tmp_path, emu, evidently={"concurrency": 4},
                          retry={"initial_backoff": 0.05, "max_backoff": 2.0}))
    await fwd.ready(session)
    total = 6000
    t0 = time.time()
    await post_all(session, fwd, "quota", [data(i) for i in range(total)])

    rates: list[tuple[float, float]] = []
    await asyncio.sleep(max(0.0, t0 + 2.0 - time.time()))  # the measurement window starts at t0 + 2 s
    at_2s = await emu.stats(session)

    async def all_delivered() -> bool:
        rates.append((round(time.time() - t0, 1), await fwd.metric(session, "forwarder_send_rate")))
        return (await emu.stats(session))["events_accepted"] >= total
    await wait_for(all_delivered, 40, f"{total} events at the emulator", interval=0.5)
    end = await emu.stats(session)

    recorded = await emu.events(session)
    assert Counter(event_id(e["data"]) for e in recorded) == Counter(range(total))
    assert fwd.dead_letters() == []
    last = max(e["received_at"] for e in recorded)
    window = last - (t0 + 2.0)
    goodput = sum(1 for e in recorded if e["received_at"] > t0 + 2.0) / window
    requests = end["requests_total"] - at_2s["requests_total"]
    throttled = end["requests_by_status"].get("429", 0) - at_2s["requests_by_status"].get("429", 0)
    report = (f"goodput {goodput:.0f} events/s over {window:.1f} s (target >= {0.85 * 500:.0f}); "
              f"throttled {throttled}/{requests} requests after 2 s; all: {end['requests_by_status']}; "
              f"forwarder_send_rate over time: {rates}")
    print(report)  # goodput is measured in benchmarks/ (backlog drain rows), not asserted here
    assert throttled <= 0.10 * requests, report


async def test_per_event_throttling_and_invalid_events_lose_nothing_and_dead_letter_only_the_invalid(
        tmp_path, procs, session):
    emu = await emulator(tmp_path, procs, session, "--throttle-event-rate", "0.2", "--invalid-event-rate", "0.02",
                         "--seed", "1")
    fwd = procs(forwarder(tmp_path, emu))
    await fwd.ready(session)
    total = 3000
    texts = [data(i) for i in range(total)]
    invalid = {i for i, t in enumerate(texts) if stable_fraction(t) < 0.02}
    assert invalid, "the seed data must hold some invalid events"
    await post_all(session, fwd, "p", texts)

    await settled(session, fwd, total, timeout=20)
    delivered, dead = await delivered_ids(session, emu), dead_letter_ids(fwd)
    stats = await emu.stats(session)
    print(f"duplicates at the emulator: {stats['duplicates']}; failed by code: {stats['events_failed_by_code']}; "
          f"forwarder_duplicates_total: {await fwd.metric(session, 'forwarder_duplicates_total')}")
    assert set(delivered) == set(range(total)) - invalid
    assert set(dead) == invalid
    assert set(delivered) & set(dead) == set()
    assert sum(dead.values()) == len(invalid)
    # Duplicates can only follow an attempt of unknown outcome, which the forwarder counts.
    assert sum(delivered.values()) - len(delivered) == stats["duplicates"]
    assert stats["duplicates"] <= await fwd.metric(session, "forwarder_duplicates_total")
    for line in fwd.dead_letters():
        assert set(line) == DEAD_LETTER_FIELDS
        assert (line["project"], line["errorCode"]) == ("p", "ValidationException")
        assert line["attempts"] >= 1 and line["first_attempt_at"] <= line["last_attempt_at"]


async def test_one_poisoned_event_in_a_refused_batch_of_50_is_bisected_out_and_dead_lettered(
        tmp_path, procs, session):
    emu = await emulator(tmp_path, procs, session, "--reject-marker", "POISON")
    fwd = procs(forwarder(tmp_path, emu))
    await fwd.ready(session)
    texts = [data(i, note="POISON" if i == 17 else "fine") for i in range(50)]
    await post_all(session, fwd, "p", texts)

    await settled(session, fwd, 50, timeout=15)
    assert await delivered_ids(session, emu) == Counter(i for i in range(50) if i != 17)
    assert dead_letter_ids(fwd) == Counter([17])
    assert fwd.dead_letters()[0]["errorCode"] == "ValidationException"


# --- a broken project ------------------------------------------------------


async def test_a_missing_project_is_dead_lettered_after_max_elapsed_while_a_healthy_one_is_delivered(
        tmp_path, procs, session):
    # That the healthy project never waits for the broken one's circuit is proven on
    # virtual time in test_sender.py; here the real processes prove the outcome.
    emu = await emulator(tmp_path, procs, session, "--missing-project", "A")
    fwd = procs(forwarder(tmp_path, emu, batch={"flush_interval": 0.2},
                          retry={"max_elapsed": 2.0, "max_backoff": 1.0}))
    await fwd.ready(session)
    a_events = 1000
    await post_all(session, fwd, "A", [data(i) for i in range(100_000, 100_000 + a_events)])
    for k in range(0, 1000, 10):  # B keeps flowing meanwhile, in small requests
        status, _ = await fwd.post(session, "B", [{"data": data(i)} for i in range(k, k + 10)])
        assert status == 200

    await settled(session, fwd, a_events + 1000, timeout=20)
    assert await delivered_ids(session, emu) == Counter(range(1000))
    lines = fwd.dead_letters()
    assert Counter(line["project"] for line in lines) == {"A": a_events}
    assert {line["errorCode"] for line in lines} == {"ResourceNotFoundException"}
    assert max(line["attempts"] for line in lines) >= 1  # the probes; the batches they held back never went
    assert "circuit_opened" in fwd.logs()
    # Nothing of A is left: its circuit no longer shows as open (the alert stops firing).
    assert await fwd.metric(session, "forwarder_circuit_open", 'project="A"') == 0


async def _has(session: aiohttp.ClientSession, emu: EmulatorProcess, project: str, n: int) -> bool:
    return (await emu.stats(session))["events_by_project"].get(project, 0) >= n


# --- replay ----------------------------------------------------------------


async def test_replaying_the_dead_letter_file_after_the_fix_delivers_it_and_reports_counts(
        tmp_path, procs, session):
    emu = await emulator(tmp_path, procs, session, "--invalid-event-rate", "0.1")
    fwd = procs(forwarder(tmp_path, emu))
    await fwd.ready(session)
    texts = [data(i) for i in range(500)]
    await post_all(session, fwd, "p", texts)
    await settled(session, fwd, 500, timeout=15)
    dead = dead_letter_ids(fwd)
    assert dead and set(dead) == {i for i, t in enumerate(texts) if stable_fraction(t) < 0.1}

    await emu.configure(session, invalid_event_rate=0.0)
    replay = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "forwarder", "replay", str(fwd.dead_letter_path), "--intake", fwd.url],
        capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"accepted {len(dead)}, rejected 0" in replay.stdout

    await wait_for(lambda: _has(session, emu, "p", 500), 10, "the replayed events")
    assert await delivered_ids(session, emu) == Counter(range(500))


# --- server errors ---------------------------------------------------------


async def test_server_errors_and_latency_are_retried_until_everything_is_delivered(tmp_path, procs, session):
    emu = await emulator(tmp_path, procs, session, "--error-rate", "0.3", "--latency", "0.05", "--seed", "3")
    fwd = procs(forwarder(tmp_path, emu))
    await fwd.ready(session)
    await post_all(session, fwd, "p", [data(i) for i in range(2000)])

    await settled(session, fwd, 2000, timeout=30)
    delivered = await delivered_ids(session, emu)
    assert set(delivered) == set(range(2000))
    assert fwd.dead_letters() == []
    assert await fwd.metric(session, "forwarder_retries_total", 'reason="server_error"') > 0


# --- an outage ---------------------------------------------------------------


async def test_an_outage_gets_probes_not_a_hammering_and_its_backlog_is_delivered_when_it_ends(
        tmp_path, procs, session):
    emu = await emulator(tmp_path, procs, session, "--down", "--quota", "200")
    fwd = procs(forwarder(tmp_path, emu, retry={"max_elapsed": 600.0, "initial_backoff": 0.1, "max_backoff": 20.0},
                          evidently={"max_rate": 200.0}))
    await fwd.ready(session)
    total = 2000
    await post_all(session, fwd, "p", [data(i) for i in range(total)])

    async def in_outage() -> bool:
        return await fwd.metric(session, "forwarder_outage") == 1
    await wait_for(in_outage, 10, "the forwarder to recognize the outage")
    during_outage = (await emu.stats(session))["requests_total"]
    probes_at_start = await fwd.metric(session, "forwarder_outage_probes_total")
    # Let the outage last while the forwarder keeps probing: each probe is one
    # call, and the next one waits for its answer and a backoff of up to 1 s.
    await wait_for(lambda: _probes_at_least(session, fwd, probes_at_start + 4), 15, "four more probes")
    calls = (await emu.stats(session))["requests_total"] - during_outage
    probes = await fwd.metric(session, "forwarder_outage_probes_total") - probes_at_start
    assert calls <= probes + 1  # nothing but probes (one may be in flight while we read)
    await emu.configure(session, down=False)

    await settled(session, fwd, total, timeout=30)
    assert await delivered_ids(session, emu) == Counter(range(total))
    assert fwd.dead_letters() == []
    assert await fwd.metric(session, "forwarder_outage") == 0
    assert await fwd.metric(session, "forwarder_outage_seconds_total") > 0
    log = fwd.logs()
    assert "outage_started" in log and "outage_ended" in log and "events_waiting" in log


async def _probes_at_least(session: aiohttp.ClientSession, fwd: ForwarderProcess, n: float) -> bool:
    return await fwd.metric(session, "forwarder_outage_probes_total") >= n
