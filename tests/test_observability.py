from __future__ import annotations

import io
import json

import pytest
import structlog
from prometheus_client import CollectorRegistry

from forwarder.app import Forwarder
from forwarder.observability import (BLOCKED_REASONS, MAX_PROJECT_LABELS, Metrics, Observer, RateLimitedLog,
                                     configure_logging)
from tests.fakes import FakeClock
from forwarder.emulator.harness import free_port
from tests.support import make_config


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level):
        return lambda event, **fields: self.lines.append((level, event, fields))


def test_repeated_warnings_are_rate_limited_and_say_how_many_were_suppressed():
    clock, rec = FakeClock(0.0), Recorder()
    limited = RateLimitedLog(rec, interval=10.0, clock=clock)
    for _ in range(5):
        limited("warning", "throttled", project="p")
    limited("warning", "other_event")
    clock.advance(10.0)
    limited("warning", "throttled", project="p")
    assert rec.lines == [("warning", "throttled", {"project": "p"}), ("warning", "other_event", {}),
                         ("warning", "throttled", {"project": "p", "suppressed": 4})]


def test_json_log_lines_carry_event_level_and_timestamp():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        log = structlog.get_logger("forwarder")
        log.info("started", port=1)
        log.debug("hidden")
        [line] = out.getvalue().splitlines()
        record = json.loads(line)
        assert record["event"] == "started" and record["level"] == "info" and record["timestamp"].endswith("Z")
    finally:
        configure_logging("info", "json")


def test_project_labels_are_capped_and_the_rest_read_other():
    metrics = Metrics(CollectorRegistry(), process_collectors=False)
    labels = [metrics.project_label(f"p{i}") for i in range(MAX_PROJECT_LABELS + 5)]
    assert labels[:MAX_PROJECT_LABELS] == [f"p{i}" for i in range(MAX_PROJECT_LABELS)]
    assert set(labels[MAX_PROJECT_LABELS:]) == {"other"}
    assert metrics.project_label("p0") == "p0"


@pytest.fixture
async def metrics_port(tmp_path, emulator):
    """A forwarder serving /metrics on a port of its own (metrics.port); yields that port."""
    port = free_port()
    fwd = Forwarder(make_config(tmp_path, emulator.url, metrics={"port": port}), credentials=("k", "s"),
                    registry=CollectorRegistry(), process_metrics=False)
    await fwd.start()
    yield port
    await fwd.shutdown()


async def test_metrics_can_be_served_on_their_own_port(metrics_port, session):
    async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
        assert r.status == 200
        assert b"forwarder_queue_depth" in await r.read()


async def test_a_loopback_metrics_listener_answers_only_a_host_naming_this_machine(metrics_port, session):
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    async with session.get(url, headers={"Host": "rebound.attacker.example"}) as r:
        assert r.status == 403 and r.headers["x-amzn-ErrorType"] == "AccessDeniedException"
        assert "does not name this machine" in (await r.json())["message"]
    for host in (f"localhost:{metrics_port}", f"127.0.0.1:{metrics_port}"):
        async with session.get(url, headers={"Host": host}) as r:
            assert r.status == 200, host


def test_the_per_batch_debug_line_computes_nothing_when_debug_is_off_and_names_the_event_ids_when_on():
    rec = Recorder()
    observer = Observer(Metrics(CollectorRegistry(), process_collectors=False), rec)
    asked = []

    def ids():
        asked.append(1)
        return "first-id", "last-id"

    configure_logging("info", "json", stream=io.StringIO())
    try:
        observer.batch_delivered("p", 50, 0.25, ids)
        assert asked == [] and rec.lines == []
        configure_logging("debug", "json", stream=io.StringIO())
        observer.batch_delivered("p", 50, 0.25, ids)
        assert rec.lines == [("debug", "batch_delivered", {"project": "p", "events": 50, "first_event_id": "first-id",
                                                          "last_event_id": "last-id", "age": 0.25})]
    finally:
        configure_logging("info", "json")
    registry = observer.metrics.registry
    assert registry.get_sample_value("forwarder_project_events_delivered_total", {"project": "p"}) == 100
    assert registry.get_sample_value("forwarder_delivery_age_seconds_count") == 2


def test_series_panels_and_alerts_read_exist_at_zero_from_the_start():
    registry = CollectorRegistry()
    metrics = Metrics(registry, process_collectors=False)
    metrics.known_project("demo")
    for reason in BLOCKED_REASONS:
        assert registry.get_sample_value("forwarder_delivery_blocked", {"reason": reason}) == 0
    for name in ("forwarder_project_events_delivered_total", "forwarder_project_events_dead_lettered_total",
                 "forwarder_circuit_open"):
        assert registry.get_sample_value(name, {"project": "demo"}) == 0, name
    assert registry.get_sample_value("forwarder_delivery_age_seconds_count") == 0


def test_dead_letter_lines_carry_the_cause_the_reason_and_the_event_ids():
    rec = Recorder()
    observer = Observer(Metrics(CollectorRegistry(), process_collectors=False), rec)
    observer.dead_lettered("ResourceNotFoundException", 2, "gone", "Project gone does not exist", ["id-0", "id-1"],
                           reason="the project does not exist (404) for retry.not_found_grace (90 s)", grace=90.0)
    [(level, event, fields)] = rec.lines
    assert (level, event) == ("error", "dead_lettered")
    assert fields["error"] == "ResourceNotFoundException: Project gone does not exist"
    assert fields["event_ids"] == ["id-0", "id-1"] and fields["grace"] == 90.0
