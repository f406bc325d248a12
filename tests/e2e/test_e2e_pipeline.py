"""End to end, core pipeline: ``forwarder run`` and ``forwarder emulator`` as real processes.

Every event carries a unique ``id`` inside its data, so what the emulator
recorded can be checked event by event: each one exactly once, in its own
project, in batches of at most 50.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import aiohttp
import boto3
import botocore.config
import orjson
import pytest
from botocore.exceptions import ClientError

from forwarder.config import to_toml
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, delivered, wait_for

pytestmark = pytest.mark.e2e

ARN = "arn:aws:evidently:us-east-1:123456789012:project/checkout"
DEFAULT_PROJECT = "orders"
PROJECTS = (DEFAULT_PROJECT, "payments", ARN)
BOTO3_PARALLEL = 8  # boto3 calls in flight at once (threads)
RAW_PARALLEL = 8


# --- helpers ---------------------------------------------------------------


def event(i: int, **extra) -> dict:
    return {"data": {"id": i, **extra}}


def data_id(recorded: dict) -> int:
    return orjson.loads(recorded["data"])["id"]


def evidently_client(url: str):
    return boto3.client(
        "evidently", region_name="us-east-1", endpoint_url=url,
        aws_access_key_id="k", aws_secret_access_key="s",
        config=botocore.config.Config(inject_host_prefix=False, retries={"total_max_attempts": 1}),
    )


def boto3_events(ids: list[int]) -> list[dict]:
    # boto3 wants data as a JSON string and timestamp as a datetime or number.
    now = datetime.now(timezone.utc)
    return [{"data": orjson.dumps({"id": i}).decode(), "timestamp": now, "type": "aws.evidently.custom"}
            for i in ids]


async def post_json(session: aiohttp.ClientSession, fwd: ForwarderProcess, project: str,
                    body: bytes | dict) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(f"{fwd.url}/events/projects/{quote(project, safe='')}", data=data,
                            headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json(loads=orjson.loads, content_type=None), r.headers


async def post_ndjson(session: aiohttp.ClientSession, fwd: ForwarderProcess, lines: list[bytes]) -> tuple[int, dict]:
    async with session.post(f"{fwd.url}/events", data=b"\n".join(lines) + b"\n",
                            headers={"Content-Type": "application/x-ndjson"}) as r:
        return r.status, await r.json(loads=orjson.loads, content_type=None)


def assert_each_once_in_its_project(recorded: list[dict], expected: dict[int, str]) -> None:
    counts = Counter(data_id(e) for e in recorded)
    assert set(counts) == set(expected), (
        f"missing {sorted(set(expected) - set(counts))[:10]}, unexpected {sorted(set(counts) - set(expected))[:10]}")
    assert [i for i, n in counts.items() if n != 1] == []
    assert [(data_id(e), e["project"]) for e in recorded if e["project"] != expected[data_id(e)]] == []


def assert_batches_of_at_most_50_from_one_project(recorded: list[dict]) -> None:
    batches: dict[int, list[dict]] = defaultdict(list)
    for e in recorded:
        batches[e["batch"]].append(e)
    assert max(len(b) for b in batches.values()) <= 50
    assert all(len({e["project"] for e in b}) == 1 for b in batches.values())


def forwarder(tmp_path: Path, emu: EmulatorProcess, **sections) -> ForwarderProcess:
    config = {
        "evidently": {"endpoint_url": emu.url, "default_project": DEFAULT_PROJECT},
        "batch": {"flush_interval": 0.2},
        "retry": {"initial_backoff": 0.05, "max_backoff": 1.0},
        "shutdown": {"drain_timeout": 5.0},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return ForwarderProcess(tmp_path, config)


# --- the whole pipeline ----------------------------------------------------


async def test_ten_thousand_events_over_three_projects_from_boto3_and_raw_http_arrive_once_each_in_batches_of_50(
        tmp_path, procs, session, emulator_process):
    fwd = procs(forwarder(tmp_path, emulator_process))
    await fwd.ready(session)
    total = 10_000
    expected = {i: PROJECTS[i % 3] for i in range(total)}
    by_project = {p: [i for i in expected if expected[i] == p] for p in PROJECTS}
    boto3_ids = {p: [i for i in ids if i < total // 2] for p, ids in by_project.items()}
    raw_ids = {p: [i for i in ids if i >= total // 2] for p, ids in by_project.items()}
    client = evidently_client(fwd.url)

    async def send_boto3(project: str, ids: list[int], gate: asyncio.Semaphore) -> None:
        async with gate:
            answer = await asyncio.to_thread(client.put_project_events, project=project, events=boto3_events(ids))
        assert answer["failedEventCount"] == 0 and len(answer["eventResults"]) == len(ids)

    async def send_json(project: str, ids: list[int], gate: asyncio.Semaphore) -> None:
        async with gate:
            status, answer, _ = await post_json(session, fwd, project, {"events": [event(i) for i in ids]})
        assert (status, answer["failedEventCount"]) == (200, 0)

    async def send_ndjson(ids: list[int], gate: asyncio.Semaphore) -> None:
        async with gate:
            status, answer = await post_ndjson(session, fwd, [orjson.dumps(event(i)) for i in ids])
        assert (status, answer["failedEventCount"], len(answer["eventResults"])) == (200, 0, len(ids))

    boto3_gate, raw_gate = asyncio.Semaphore(BOTO3_PARALLEL), asyncio.Semaphore(RAW_PARALLEL)
    sends = [send_boto3(p, ids[k:k + 50], boto3_gate) for p, ids in boto3_ids.items() for k in range(0, len(ids), 50)]
    # The default project's raw half goes half as NDJSON to POST /events, half as JSON.
    orders = raw_ids[DEFAULT_PROJECT]
    ndjson, orders_json = orders[:len(orders) // 2], orders[len(orders) // 2:]
    sends += [send_ndjson(ndjson[k:k + 500], raw_gate) for k in range(0, len(ndjson), 500)]
    json_ids = {**raw_ids, DEFAULT_PROJECT: orders_json}
    sends += [send_json(p, ids[k:k + 500], raw_gate) for p, ids in json_ids.items() for k in range(0, len(ids), 500)]
    await asyncio.gather(*sends)

    recorded = await delivered(session, emulator_process.url, total, timeout=40)
    assert_each_once_in_its_project(recorded, expected)
    assert_batches_of_at_most_50_from_one_project(recorded)
    assert (await emulator_process.stats(session))["duplicates"] == 0


async def test_a_trickle_of_one_event_per_100ms_is_flushed_by_deadlines_not_held_until_it_ends(
        tmp_path, procs, session, emulator_process):
    fwd = procs(forwarder(tmp_path, emulator_process, batch={"flush_interval": 0.5}))
    await fwd.ready(session)
    start = time.monotonic()
    for i in range(20):
        # The trickle is the workload: one event every 100 ms, on a fixed schedule.
        await asyncio.sleep(max(0.0, start + i * 0.1 - time.monotonic()))
        status, _ = await fwd.post(session, "trickle", [event(i)])
        assert status == 200

    recorded = await delivered(session, emulator_process.url, 20, timeout=10)
    # A deadline reset by every new event would hold the whole 2 s trickle in one
    # batch; fixed at the first event, 0.5 s deadlines cut it into several.
    sizes = (await emulator_process.stats(session))["batch_sizes"]
    assert sum(int(size) * n for size, n in sizes.items()) == 20
    assert sum(sizes.values()) >= 3, sizes
    assert_each_once_in_its_project(recorded, {i: "trickle" for i in range(20)})


# --- bad input -------------------------------------------------------------


async def test_bad_input_is_refused_naming_the_problem_while_valid_events_beside_it_are_delivered(
        tmp_path, procs, session, emulator_process):
    fwd = procs(forwarder(tmp_path, emulator_process,
                          intake={"max_body_bytes": 4096, "max_events_per_request": 20}))
    await fwd.ready(session)
    before = [event(i, note="accepted before the bad input") for i in range(15)]
    assert (await post_json(session, fwd, "good", {"events": before}))[0] == 200

    status, answer, headers = await post_json(session, fwd, "good", b'{"events": [{"data": ')
    assert (status, headers.get("x-amzn-ErrorType")) == (400, "ValidationException")
    assert list(answer) == ["message"] and "JSON" in answer["message"]

    mixed = [event(100), {"data": [1, 2]}, event(101), {"data": {"id": -1}, "type": "custom"},
             event(102), {"data": {"id": -2}, "timestamp": "yesterday"}, event(103)]
    status, answer, _ = await post_json(session, fwd, "good", {"events": mixed})
    assert (status, answer["failedEventCount"]) == (200, 3)
    results = answer["eventResults"]
    assert ["eventId" in r for r in results] == [True, False, True, False, True, False, True]
    assert [(r["errorCode"], field in r["errorMessage"]) for r, field in
            zip(results[1::2], ("events[1].data", "events[3].type", "events[5].timestamp"))] == [
        ("ValidationException", True)] * 3

    status, answer = await post_ndjson(session, fwd, [orjson.dumps(event(104)), b"{not json", orjson.dumps(event(105))])
    assert (status, answer["failedEventCount"]) == (200, 1)
    assert "events[1]" in answer["eventResults"][1]["errorMessage"]

    status, answer, headers = await post_json(session, fwd, "bad project!", {"events": [event(-3)]})
    assert (status, headers.get("x-amzn-ErrorType")) == (400, "ValidationException")
    assert "bad project!" in answer["message"]
    async with session.post(f"{fwd.url}/events/projects/a/b", json={"events": [event(-4)]}) as r:
        assert r.status == 400 and "a/b" in (await r.json())["message"]

    status, answer, headers = await post_json(session, fwd, "good", {"events": [event(-5, pad="x" * 5000)]})
    assert (status, headers.get("x-amzn-ErrorType")) == (413, "PayloadTooLargeException")
    status, answer, _ = await post_json(session, fwd, "good", {"events": [event(-6 - k) for k in range(21)]})
    assert status == 400 and "max_events_per_request" in answer["message"]

    expected = {i: "good" for i in [*range(15), 100, 101, 102, 103]} | {104: DEFAULT_PROJECT, 105: DEFAULT_PROJECT}
    recorded = await delivered(session, emulator_process.url, len(expected), timeout=10)
    assert_each_once_in_its_project(recorded, expected)
    # Accepted before the bad requests, and not corrupted by them.
    assert [orjson.loads(e["data"]) for e in recorded if data_id(e) < 15] == [b["data"] for b in before]
    assert await fwd.metric(session, "forwarder_events_received_total") == len(expected)


async def test_a_boto3_client_works_unchanged_and_gets_botocore_error_codes(tmp_path, procs, session,
                                                                            emulator_process):
    fwd = procs(forwarder(tmp_path, emulator_process, intake={"max_events_per_request": 100}))
    await fwd.ready(session)
    client = evidently_client(fwd.url)

    answer = await asyncio.to_thread(client.put_project_events, project=ARN, events=boto3_events([1, 2, 3]))
    assert answer["failedEventCount"] == 0
    assert [set(r) for r in answer["eventResults"]] == [{"eventId"}] * 3

    bad_data = [{"data": "not json", "timestamp": datetime.now(timezone.utc), "type": "aws.evidently.custom"},
                *boto3_events([4])]
    answer = await asyncio.to_thread(client.put_project_events, project="shop", events=bad_data)
    assert answer["failedEventCount"] == 1
    assert answer["eventResults"][0]["errorCode"] == "ValidationException"
    assert "events[0].data" in answer["eventResults"][0]["errorMessage"]

    for project, events, named in [("bad project!", boto3_events([-1]), "bad project!"),
                                   ("shop", boto3_events(list(range(-200, -99))), "max_events_per_request")]:
        with pytest.raises(ClientError) as caught:
            await asyncio.to_thread(client.put_project_events, project=project, events=events)
        error = caught.value.response["Error"]
        assert error["Code"] == "ValidationException" and named in error["Message"]

    recorded = await delivered(session, emulator_process.url, 4, timeout=10)
    assert_each_once_in_its_project(recorded, {1: ARN, 2: ARN, 3: ARN, 4: "shop"})


# --- lifecycle, config, health ---------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_after_posting_exits_0_with_everything_delivered(tmp_path, procs, session,
                                                                            emulator_process, sig):
    # A long flush interval leaves partial batches open when the signal comes: drain must flush them.
    fwd = procs(forwarder(tmp_path, emulator_process, batch={"flush_interval": 30.0}))
    await fwd.ready(session)
    expected = {i: PROJECTS[i % 3] for i in range(1234)}
    for project in PROJECTS:
        ids = [i for i, p in expected.items() if p == project]
        for k in range(0, len(ids), 500):
            assert (await post_json(session, fwd, project, {"events": [event(i) for i in ids[k:k + 500]]}))[0] == 200

    fwd.signal(sig)
    assert await fwd.wait(timeout=15) == 0, fwd.logs()
    recorded = await emulator_process.events(session)
    assert_each_once_in_its_project(recorded, expected)
    assert_batches_of_at_most_50_from_one_project(recorded)


def check_config(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forwarder", "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **env})


def test_check_config_prints_the_effective_config_with_env_overrides_and_names_a_bad_key(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(to_toml({"batch": {"flush_interval": 0.5}, "evidently": {"region": "us-west-2"}}))
    shown = check_config(good, FORWARDER_EVIDENTLY__REGION="eu-west-1")
    assert shown.returncode == 0, shown.stderr
    assert "[batch]" in shown.stdout and "flush_interval = 0.5" in shown.stdout
    assert 'region = "eu-west-1"' in shown.stdout and "us-west-2" not in shown.stdout
    assert "max_events = 50" in shown.stdout  # defaults are shown too

    bad = tmp_path / "bad.toml"
    bad.write_text(to_toml({"batch": {"max_events": 80}}))
    refused = check_config(bad)
    assert refused.returncode != 0
    assert "batch.max_events" in refused.stderr and "80" in refused.stderr


async def test_health_readiness_and_metrics_report_the_pipeline_and_the_queue_drains_to_zero(
        tmp_path, procs, session, emulator_process):
    fwd = procs(forwarder(tmp_path, emulator_process))
    await fwd.ready(session)
    for path in ("/healthz", "/readyz"):
        async with session.get(fwd.url + path) as r:
            assert r.status == 200, path
    status, _, _ = await post_json(session, fwd, "m", {"events": [event(i) for i in range(120)]})
    assert status == 200

    await delivered(session, emulator_process.url, 120, timeout=10)

    async def drained() -> bool:
        return (await fwd.metric(session, "forwarder_events_sent_total") == 120
                and await fwd.metric(session, "forwarder_queue_depth") == 0)
    await wait_for(drained, 10, "forwarder_events_sent_total 120 and forwarder_queue_depth 0")
    assert await fwd.metric(session, "forwarder_events_received_total") == 120
