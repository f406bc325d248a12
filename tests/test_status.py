"""GET /status and `forwarder status` (issue 22): the state an operator needs, bounded, rendered."""

from __future__ import annotations

import asyncio
import json
import sys

from prometheus_client import CollectorRegistry

from forwarder import status_view
from forwarder.app import Forwarder
from forwarder.emulator.server import Emulator
from forwarder.emulator.faults import FaultConfig
from forwarder.emulator.harness import free_port, wait_for
from forwarder.observability import MAX_PROJECT_LABELS
from tests.support import make_config


async def started(tmp_path, emulator_url, **sections) -> Forwarder:
    fwd = Forwarder(make_config(tmp_path, emulator_url, **sections), credentials=("k", "s"),
                    registry=CollectorRegistry(), process_metrics=False)
    await fwd.start()
    fwd.url = f"http://127.0.0.1:{fwd.intake.port}"  # type: ignore[attr-defined]
    return fwd


async def get_status(session, url) -> dict:
    async with session.get(f"{url}/status") as r:
        assert r.status == 200
        return await r.json()


async def test_status_shows_per_project_counts_and_a_missing_projects_circuit_with_its_grace(tmp_path, session):
    emulator = Emulator(FaultConfig(missing_projects=("gone",)))
    await emulator.start("127.0.0.1", 0)
    fwd = await started(tmp_path, emulator.url, retry={"not_found_grace": 30.0})
    try:
        for project, n in (("here", 4), ("gone", 2), ("here", 1)):
            async with session.post(f"{fwd.url}/events/projects/{project}",
                                    json={"events": [{"data": {"i": i}} for i in range(n)]}) as r:
                assert r.status == 200

        async def settled() -> bool:
            rows = {p["project"]: p for p in (await get_status(session, fwd.url))["projects"]}
            return rows.get("here", {}).get("delivered") == 5 and rows.get("gone", {}).get("circuit") != "closed"
        await wait_for(settled, 10, "5 events of 'here' delivered and the circuit of 'gone' open")
        doc = await get_status(session, fwd.url)
        rows = {p["project"]: p for p in doc["projects"]}
        assert rows["here"]["last_delivery"] is not None and rows["here"]["dead_lettered"] == 0
        gone = rows["gone"]
        assert gone["reason"] == "ResourceNotFoundException: Project gone does not exist"
        assert gone["not_found_grace"] == 30.0 and 0 < gone["dead_lettered_in"] <= 30.0
        assert gone["queued"] + gone["in_flight"] == 2
        assert doc["buffer"]["events"] == 2 and doc["buffer"]["max_events"] == 100_000
        assert doc["evidently"] == {"region": "us-east-1", "region_source": "default", "endpoint": emulator.url,
                                    "credentials": {"found": True, "method": "explicit"}}
        assert doc["sending"]["last_error"] == gone["reason"]
        assert doc["outage"] is None and doc["blocked"] is None and doc["version"]
    finally:
        await fwd.shutdown()
        await emulator.close()


async def test_status_is_served_on_the_metrics_listener_too(tmp_path, emulator, session):
    port = free_port()
    fwd = await started(tmp_path, emulator.url, metrics={"port": port})
    try:
        doc = await get_status(session, f"http://127.0.0.1:{port}")
        assert doc["state"] == "ok" and doc["projects"] == []
    finally:
        await fwd.shutdown()


async def test_projects_beyond_the_label_cap_are_summed_into_one_row(tmp_path, emulator, session):
    fwd = await started(tmp_path, emulator.url)
    try:
        total = MAX_PROJECT_LABELS + 7
        for i in range(total):
            async with session.post(f"{fwd.url}/events/projects/p{i:03d}", json={"events": [{"data": {}}]}) as r:
                assert r.status == 200

        async def delivered() -> bool:
            return sum(p["delivered"] for p in (await get_status(session, fwd.url))["projects"]) == total
        await wait_for(delivered, 20, f"{total} events delivered")
        rows = (await get_status(session, fwd.url))["projects"]
        # The default project holds one of the labels from the start: 49 rows of their own, 8 summed.
        assert len(rows) == MAX_PROJECT_LABELS and rows[-1]["project"] == "other"
        assert rows[-1]["delivered"] == 8 and {r["delivered"] for r in rows[:-1]} == {1}
    finally:
        await fwd.shutdown()


def test_the_table_shows_the_state_first_then_one_row_per_project():
    doc = {
        "version": "0.1.0", "uptime": 75.0, "state": "blocked",
        "evidently": {"region": "eu-west-1", "region_source": "AWS_REGION", "endpoint": "https://x",
                      "credentials": {"found": True, "method": "env"}},
        "blocked": {"reason": "signature_refused", "since": "2026-12-05T07:00:00+00:00",
                    "error": "delivery blocked: InvalidSignatureException: Credential should be scoped"},
        "buffer": {"type": "disk", "events": 1200, "max_events": 100000, "bytes": 2048, "max_bytes": 1 << 20,
                   "full": False, "oldest_event_age": 62.5},
        "sending": {"allowed_rate": 50.0, "max_rate": 1000.0, "measured_rate": 0.5, "controller": "cubic",
                    "phase": "slow_start", "calls_in_flight": 1, "last_error": None, "last_error_at": None},
        "outage": None,
        "dead_letter": {"path": "/var/lib/forwarder/dl.ndjson", "events": 3, "bytes": 900},
        "projects": [{"project": "shop", "queued": 1200, "in_flight": 0, "delivered": 10, "dead_lettered": 3,
                      "last_delivery": None, "last_dead_letter": None, "circuit": "open",
                      "reason": "InvalidSignatureException: Credential should be scoped"}],
    }
    text = status_view.render(doc, "http://127.0.0.1:8080", now=0.0)
    lines = text.splitlines()
    assert lines[0] == "forwarder 0.1.0 at http://127.0.0.1:8080, up 1m15s: BLOCKED"
    assert "region eu-west-1 (AWS_REGION)" in lines[1] and "credentials env" in lines[1]
    assert lines[2].startswith("blocked     delivery blocked: InvalidSignatureException")
    assert "1,200/100,000 events" in text and "oldest event 1m02s" in text
    header, row = lines[-2], lines[-1]
    assert header.split()[:3] == ["PROJECT", "QUEUED", "IN"]
    assert row.split()[:5] == ["shop", "1,200", "0", "10", "3"]
    assert row.endswith("open: InvalidSignatureException: Credential should be scoped")


async def test_forwarder_status_exits_2_when_nothing_answers_and_prints_json_when_asked(tmp_path, emulator):
    async def run(*args: str) -> tuple[int, str, str]:
        child = await asyncio.create_subprocess_exec(sys.executable, "-m", "forwarder", "status", *args,
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await child.communicate()
        return child.returncode or 0, out.decode(), err.decode()

    code, _, err = await run("--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert code == 2 and "cannot reach" in err
    fwd = await started(tmp_path, emulator.url)
    try:
        code, out, _ = await run("--url", fwd.url, "--json")  # type: ignore[attr-defined]
        assert code == 0 and json.loads(out)["state"] == "ok"
    finally:
        await fwd.shutdown()
