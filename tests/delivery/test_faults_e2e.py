"""The fault matrix, with real daemons: broken upstream answers, reload storms, repeated signals,
an unwritable dead-letter file. Each case checks the books balance: every acknowledged event is
delivered or dead-lettered (or counted as dropped), possible duplicates are counted, and the
queue goes back to 0.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections import Counter

import orjson
import pytest

from forwarder.config import to_toml
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, wait_for
from tests.support import post_numbered, process_sections, queue_empty
from tests.upstream import Reply, Upstream

pytestmark = pytest.mark.e2e


def ids(datas) -> Counter:
    return Counter(orjson.loads(d)["i"] for d in datas)


# --- upstream answers that confirm nothing (issue 16, items 1-3) --------------

BAD_ANSWERS = {
    "html page": Reply(body=b"<html><body>Proxy login</body></html>", content_type="text/html"),
    "truncated json": Reply(body=b'{"eventResults":[{"eventId":"00000000-0000-4000-8000-000000000000"},'),
    "empty body": Reply(body=b""),
    "empty object": Reply(body=b"{}"),
    "null results": Reply(body=b'{"eventResults":null,"failedEventCount":0}'),
    "one result for ten": Reply(body=b'{"eventResults":[{"eventId":"00000000-0000-4000-8000-000000000000"}],'
                                     b'"failedEventCount":0}'),
    "failed count without codes": Reply(body=b'{"eventResults":[' + b",".join([b'{"eventId":"x"}'] * 10)
                                             + b'],"failedEventCount":10}'),
    "extra result with an error": Reply(body=b'{"eventResults":[' + b",".join([b'{"eventId":"x"}'] * 10)
                                             + b',{"errorCode":"ValidationException"}],"failedEventCount":1}'),
    "closed mid-answer": Reply(body=b'{"eventResults":[' + b",".join([b'{"eventId":"x"}'] * 10) + b"]}",
                               cut_after=90),
}


@pytest.mark.parametrize("bad", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
async def test_an_answer_that_confirms_nothing_is_retried_and_counted_never_taken_as_delivered(
        tmp_path, procs, session, bad):
    bad_calls = 3
    upstream = await Upstream(lambda n, events: bad if n < bad_calls else Reply()).start()
    try:
        fwd = procs(ForwarderProcess(tmp_path, process_sections(upstream.url)))
        await fwd.ready(session)
        for k in range(0, 100, 10):
            await post_numbered(session, fwd, k, 10)
        await wait_for(lambda: queue_empty(session, fwd), 30, "the queue to drain")
        assert set(ids(upstream.received.elements())) == set(range(100))  # every event arrived, some twice
        assert await fwd.metric(session, "forwarder_events_sent_total") == 100  # each counted once
        resent = sum(len(events) for events in upstream.calls[:bad_calls])
        assert sum(ids(upstream.received.elements()).values()) == 100 + resent
        # each extra copy sent after an answer that confirmed nothing counts (issue 21 item 7: copies, not events)
        assert await fwd.metric(session, "forwarder_duplicates_total") == resent
        assert fwd.dead_letters() == []
        assert "retry_scheduled" in fwd.logs()
    finally:
        await upstream.close()


# --- a SIGHUP storm while events flow (issue 16 item 4 and its siblings) ------


async def test_a_sighup_storm_changing_batch_limits_loses_and_duplicates_nothing(tmp_path, procs, session):
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    config = process_sections(emu.url, batch={"max_events": 50, "flush_interval": 1.0}, evidently={"concurrency": 4})
    fwd = procs(ForwarderProcess(tmp_path, config))
    await fwd.ready(session)
    total, per_request = 20_000, 40

    async def storm() -> int:
        reloads = 0
        for n in range(100):  # one per 100 ms for 10 s
            small = n % 2 == 0
            config["batch"] = {"max_events": 7 if small else 50, "flush_interval": 0.05 if small else 1.0}
            staged = fwd.config_path.with_suffix(".next")
            staged.write_text(to_toml(config))
            os.replace(staged, fwd.config_path)
            fwd.signal(signal.SIGHUP)
            reloads += 1
            await asyncio.sleep(0.1)
        return reloads

    async def flow() -> None:
        for k in range(0, total, per_request):
            await post_numbered(session, fwd, k, per_request)
            await asyncio.sleep(0.02)  # the stream lasts about as long as the storm

    reloads, _ = await asyncio.gather(storm(), flow())
    await wait_for(lambda: queue_empty(session, fwd), 60, "the queue to drain")
    delivered = ids(e["data"] for e in await emu.events(session))
    assert delivered == Counter(range(total))  # each exactly once
    stats = await emu.stats(session)
    assert max(int(size) for size in stats["batch_sizes"]) <= 50
    assert await fwd.metric(session, "forwarder_events_sent_total") == total
    assert fwd.logs().count('"reloaded"') >= reloads // 2  # the daemon took them, it did not stop
    assert fwd.popen.poll() is None


# --- stop signals during the drain (issue 16 item 10) ---------------------------


async def test_a_second_sigterm_cuts_the_drain_short_and_still_exits_in_order(tmp_path, procs, session):
    emu = procs(EmulatorProcess(tmp_path, "--down"))
    await emu.ready(session)
    fwd = procs(ForwarderProcess(tmp_path, process_sections(emu.url, shutdown={"drain_timeout": 600.0})))
    await fwd.ready(session)
    await post_numbered(session, fwd, 0, 200)
    fwd.signal(signal.SIGTERM)
    await wait_for(lambda: _logged(fwd, '"draining"'), 10, "the drain to begin")
    fwd.signal(signal.SIGHUP)  # ignored while draining, not the default action (death)
    await wait_for(lambda: _logged(fwd, '"reload_ignored"'), 10, "the reload to be ignored")
    assert fwd.popen.poll() is None
    fwd.signal(signal.SIGTERM)
    assert await fwd.wait(30) == 0  # far sooner than drain_timeout
    stopped = _last(fwd, "stopped")
    assert stopped["dropped"] == 200 and stopped["undelivered"] == 200
    assert _logged_now(fwd, '"shutdown_hurried"')
    assert "Traceback" not in fwd.logs()


# --- the dead-letter file cannot be written (issue 16 item 5) -------------------


async def test_an_unwritable_dead_letter_file_keeps_refused_events_and_never_resends_delivered_ones(
        tmp_path, procs, session):
    emu = procs(EmulatorProcess(tmp_path, "--invalid-event-rate", "0.1", "--seed", "3"))
    await emu.ready(session)
    fwd = procs(ForwarderProcess(tmp_path, process_sections(emu.url)))
    await fwd.ready(session)
    # A directory where the file should be: every write fails (root ignores permissions).
    fwd.dead_letter_path.mkdir(parents=True)
    for k in range(0, 500, 50):
        await post_numbered(session, fwd, k, 50)

    async def write_errors() -> bool:
        return await fwd.metric(session, "forwarder_dead_letter_write_errors_total") > 0
    await wait_for(write_errors, 20, "dead-letter writes to fail")
    assert await fwd.metric(session, "forwarder_queue_depth") > 0  # the refused events are kept
    shutil.rmtree(fwd.dead_letter_path)  # writable again
    await wait_for(lambda: queue_empty(session, fwd), 30, "the queue to drain")

    delivered = ids(e["data"] for e in await emu.events(session))
    dead = Counter(orjson.loads(line["event"]["data"])["i"] for line in fwd.dead_letters())
    assert all(n == 1 for n in delivered.values())  # nothing delivered was sent again
    assert not set(delivered) & set(dead)
    assert set(delivered) | set(dead) == set(range(500))
    assert dead and all(n == 1 for n in dead.values())


def _events(fwd: ForwarderProcess, name: str) -> list[dict]:
    found = []
    for line in fwd.logs().splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if record.get("event") == name:
            found.append(record)
    return found


def _last(fwd: ForwarderProcess, name: str) -> dict:
    found = _events(fwd, name)
    assert found, f"no {name} line in the log"
    return found[-1]


def _logged_now(fwd: ForwarderProcess, text: str) -> bool:
    return text in fwd.logs()


async def _logged(fwd: ForwarderProcess, text: str) -> bool:
    return _logged_now(fwd, text)

