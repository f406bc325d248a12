"""The intake and the daemon's lifecycle, in-process against the in-process emulator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess

import botocore.exceptions
import pytest
from prometheus_client import CollectorRegistry

from forwarder.app import Forwarder
from forwarder.emulator.harness import ForwarderProcess, delivered, wait_for
from tests.support import JSON, boto_client, make_config
from tests.tools import require_tool


@pytest.fixture
async def forwarder(tmp_path, emulator):
    fwd = Forwarder(make_config(tmp_path, emulator.url), credentials=("k", "s"), registry=CollectorRegistry(),
                    process_metrics=False)
    await fwd.start()
    fwd.url = f"http://127.0.0.1:{fwd.intake.port}"
    yield fwd
    await fwd.shutdown()


async def test_a_real_boto3_client_works_unchanged_against_the_intake(forwarder, emulator, session):
    arn = "arn:aws:evidently:us-east-1:123456789012:project/checkout"
    client = boto_client(forwarder.url)
    answer = await asyncio.to_thread(client.put_project_events, project=arn, events=[
        {"data": json.dumps({"k": 1}), "timestamp": 1_790_000_000, "type": "aws.evidently.evaluation"}])
    assert answer["failedEventCount"] == 0 and answer["eventResults"][0]["eventId"]
    await delivered(session, emulator.url, 1, 5.0)
    assert emulator.accepted[0].project == arn  # the %2F-encoded ARN reached its own project
    assert emulator.accepted[0].type == "aws.evidently.evaluation"
    with pytest.raises(botocore.exceptions.ClientError) as err:
        await asyncio.to_thread(client.put_project_events, project="bad name!", events=[])
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert "bad name!" in err.value.response["Error"]["Message"]


async def test_an_arn_in_a_region_the_forwarder_does_not_serve_is_refused_per_event_and_never_buffered(
        forwarder, emulator, session):
    client = boto_client(forwarder.url)
    there = "arn:aws:evidently:eu-west-1:123456789012:project/checkout"
    event = {"data": json.dumps({"k": 1}), "timestamp": 1_790_000_000, "type": "aws.evidently.custom"}
    answer = await asyncio.to_thread(client.put_project_events, project=there, events=[event, {**event, "data": "x"}])
    assert answer["failedEventCount"] == 2
    first, second = answer["eventResults"]
    assert first["errorCode"] == "ValidationException" and "'eu-west-1'" in first["errorMessage"]
    assert "'us-east-1'" in first["errorMessage"] and "evidently.region" in first["errorMessage"]
    assert second["errorCode"] == "ValidationException" and "data" in second["errorMessage"]  # its own fault first
    assert forwarder.buffer.depth == 0
    registry = forwarder.metrics.registry
    assert registry.get_sample_value("forwarder_events_rejected_total", {"reason": "wrong_region"}) == 1
    assert registry.get_sample_value("forwarder_events_rejected_total", {"reason": "validation"}) == 1
    await forwarder.shutdown()
    assert emulator.accepted == []


async def test_a_raw_extra_slash_is_a_validation_error_naming_the_project(forwarder, session):
    async with session.post(f"{forwarder.url}/events/projects/a/b", json={"events": []}) as r:
        assert r.status == 400
        assert r.headers["x-amzn-ErrorType"] == "ValidationException"
        assert "'a/b'" in (await r.json())["message"]


async def test_oversized_and_overfull_requests_are_refused_whole(forwarder, session):
    big = {"events": [{"data": {"x": "y" * 5000}}]}
    async with session.post(f"{forwarder.url}/events/projects/p", json=big) as r:
        assert r.status == 413 and "intake.max_body_bytes" in (await r.json())["message"]
    many = {"events": [{"data": {}}] * 21}
    async with session.post(f"{forwarder.url}/events/projects/p", json=many) as r:
        assert r.status == 400 and "intake.max_events_per_request" in (await r.json())["message"]


async def test_a_wire_form_body_with_one_bad_event_keeps_the_others_and_names_the_bad_one(forwarder, emulator, session):
    events = [{"data": json.dumps({"n": i, "pad": "x" * 40}), "timestamp": 1_790_000_000 + i,
               "type": "aws.evidently.custom"} for i in range(20)]
    events[7]["data"] = '{"n": 7'  # truncated JSON
    body = json.dumps({"events": events}).encode()
    assert len(body) > 1024  # the size that tries the msgspec fast path first
    async with session.post(f"{forwarder.url}/events/projects/p", data=body, headers=JSON) as r:
        answer = await r.json()
    assert r.status == 200 and answer["failedEventCount"] == 1
    assert answer["eventResults"][7]["errorCode"] == "ValidationException"
    assert "events[7].data" in answer["eventResults"][7]["errorMessage"]
    await delivered(session, emulator.url, 19, 5.0)
    assert sorted(json.loads(e.data)["n"] for e in emulator.accepted) == [i for i in range(20) if i != 7]


async def test_unknown_paths_and_wrong_methods_get_aws_style_errors(forwarder, session):
    async with session.post(f"{forwarder.url}/nowhere", json={}) as r:
        assert r.status == 404 and r.headers["x-amzn-ErrorType"] == "UnknownOperationException"
    async with session.get(f"{forwarder.url}/events/projects/p") as r:
        assert r.status == 405 and r.headers["Allow"] == "POST"
    async with session.post(f"{forwarder.url}/healthz") as r:
        assert r.status == 405 and r.headers["Allow"] == "GET, HEAD"
    async with session.head(f"{forwarder.url}/healthz") as r:
        assert r.status == 200


async def test_a_chunked_body_over_the_limit_is_refused_without_a_content_length(forwarder, session):
    async def chunks():
        for _ in range(10):
            yield b"x" * 1000  # 10,000 bytes, chunked: the limit is 4096

    async with session.post(f"{forwarder.url}/events/projects/p", data=chunks(), headers=JSON) as r:
        assert r.status == 413 and "intake.max_body_bytes (4096)" in (await r.json())["message"]
    assert forwarder.buffer.depth == 0


async def test_post_events_uses_the_default_project_with_ndjson(forwarder, emulator, session):
    body = b'{"data":{"n":1}}\n{"data":{"n":2}}\n'
    async with session.post(f"{forwarder.url}/events", data=body,
                            headers={"Content-Type": "application/x-ndjson"}) as r:
        assert (await r.json())["failedEventCount"] == 0
    await delivered(session, emulator.url, 2, 5.0)
    assert {e.project for e in emulator.accepted} == {"dflt"}


async def test_full_buffer_answers_429_with_retry_after_and_not_ready_until_there_is_room(tmp_path, emulator, session):
    emulator.configure(down=True)
    cfg = make_config(tmp_path, emulator.url, buffer={"max_events": 10})
    fwd = Forwarder(cfg, credentials=("k", "s"), registry=CollectorRegistry(), process_metrics=False)
    await fwd.start()
    url = f"http://127.0.0.1:{fwd.intake.port}"
    try:
        async with session.post(f"{url}/events/projects/p", json={"events": [{"data": {}}] * 10}) as r:
            assert r.status == 200
        async with session.post(f"{url}/events/projects/p", json={"events": [{"data": {}}]}) as r:
            assert r.status == 429
            assert r.headers["x-amzn-ErrorType"] == "ThrottlingException"
            assert int(r.headers["Retry-After"]) >= 1
        async with session.get(f"{url}/readyz") as r:
            assert r.status == 503 and (await r.json())["reason"] == "buffer full"
        emulator.configure(down=False)
        await delivered(session, emulator.url, 10, 5.0)

        async def ready():
            async with session.get(f"{url}/readyz") as r:
                return r.status == 200
        await wait_for(ready, 5, "/readyz 200 after the buffer drained")
    finally:
        await fwd.shutdown()


async def test_shutdown_flushes_before_stopping_rejects_after_and_readyz_shows_what_is_left(tmp_path, emulator, session):
    fwd = Forwarder(make_config(tmp_path, emulator.url, batch={"flush_interval": 30.0}), credentials=("k", "s"),
                    registry=CollectorRegistry(), process_metrics=False)
    await fwd.start()
    url = f"http://127.0.0.1:{fwd.intake.port}"
    async with session.post(f"{url}/events/projects/p", json={"events": [{"data": {"i": i}} for i in range(7)]}) as r:
        assert r.status == 200
    fwd.intake.stop_accepting()  # phase 1 of shutdown, observed from outside
    async with session.post(f"{url}/events/projects/p", json={"events": [{"data": {}}]}) as r:
        assert r.status == 503
    async with session.get(f"{url}/readyz") as r:
        assert await r.json() == {"status": "not ready", "reason": "draining", "queue_depth": 7}
    await fwd.shutdown()
    assert len(emulator.accepted) == 7  # the partial batch did not wait for its 30 s deadline
    assert fwd.metrics.registry.get_sample_value("forwarder_events_dropped_total", {"reason": "shutdown"}) == 0


async def test_metrics_output_passes_promtool(forwarder, session):
    promtool = require_tool("promtool")
    async with session.post(f"{forwarder.url}/events/projects/p", json={"events": [{"data": {}}, {"data": 1}]}):
        pass
    async with session.get(f"{forwarder.url}/metrics") as r:
        text = await r.read()
    for name in ("forwarder_queue_depth", "forwarder_events_received_total", "forwarder_send_rate",
                 'forwarder_events_rejected_total{reason="validation"} 1.0', "forwarder_build_info"):
        assert name.encode() in text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert check.returncode == 0 and check.stdout.strip() == b"" and check.stderr.strip() == b"", check


async def test_systemd_is_told_ready_and_then_stopping(tmp_path, emulator, monkeypatch):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        fwd = Forwarder(make_config(tmp_path, emulator.url), credentials=("k", "s"), registry=CollectorRegistry(),
                        process_metrics=False)
        await fwd.start()
        assert sock.recv(4096).split(b"\n")[0] == b"READY=1"
        await fwd.shutdown()
        assert sock.recv(4096).split(b"\n")[0] == b"STOPPING=1"


@pytest.mark.e2e
async def test_sighup_applies_live_keys_and_reports_the_others(tmp_path, procs, session, emulator_process):
    fwd = procs(ForwarderProcess(tmp_path, {"evidently": {"endpoint_url": emulator_process.url},
                                            "batch": {"flush_interval": 0.2}}))
    await fwd.ready(session)
    text = fwd.config_path.read_text()
    fwd.config_path.write_text(text.replace("flush_interval = 0.2", "flush_interval = 0.3")
                               .replace('level = "info"', 'level = "debug"')
                               .replace(f"port = {fwd.port}", f"port = {fwd.port + 1}"))
    fwd.signal(signal.SIGHUP)

    async def reloaded():
        return '"reloaded"' in fwd.logs()
    await wait_for(reloaded, 10, "the reload log line")
    line = json.loads(next(line for line in fwd.logs().splitlines() if '"reloaded"' in line))
    assert line["applied"] == ["batch.flush_interval", "log.level"]
    assert line["needs_restart"] == ["intake.port"]
    status, body = await fwd.post(session, "p", [{"data": {"after": "reload"}}])
    assert status == 200  # still serving on the old port
    fwd.terminate()
    assert await fwd.wait(10) == 0


def test_event_ids_are_uuid_shaped_and_unique_across_requests():
    import uuid

    from forwarder.intake.answers import EventIds
    ids = EventIds()
    answers = [json.loads(ids.all_accepted(n, append_id)) for append_id, n in enumerate((3, 3, 0, 50))]
    partial = ids.one_request(4)
    seen = [r["eventId"] for a in answers for r in a["eventResults"]] + [partial(0), partial(1)]
    assert len(seen) == len(set(seen)) == 58
    assert all(str(uuid.UUID(i)) == i for i in seen)
    assert [a["failedEventCount"] for a in answers] == [0, 0, 0, 0]


async def test_the_daemon_run_freezes_its_start_up_objects_out_of_the_cyclic_gc(tmp_path, emulator):
    import gc

    fwd = Forwarder(make_config(tmp_path, emulator.url), credentials=("k", "s"), registry=CollectorRegistry(),
                    process_metrics=False)
    before = gc.get_freeze_count()
    run = asyncio.create_task(fwd.run())
    try:
        async def frozen():
            return gc.get_freeze_count() > before
        await wait_for(frozen, 10.0, "run() to freeze the start-up objects")
        assert fwd.intake.port  # frozen after start-up, not before
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # what a service manager sends: run() handles it (installed first)
        assert await run == 0
        gc.unfreeze()
