"""SIGHUP on a real daemon: a reload that cannot read its file keeps the service, and every
live key (config.LIVE) takes effect, checked by what Evidently receives or what the daemon
does, not by its log line."""

from __future__ import annotations

import os
import signal
from collections import Counter

import orjson
import pytest

from forwarder.config import to_toml
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, wait_for
from tests.support import post_numbered, process_sections, queue_empty

pytestmark = pytest.mark.e2e


def rewrite(fwd: ForwarderProcess, config: dict) -> None:
    staged = fwd.config_path.with_suffix(".next")
    staged.write_text(to_toml(config))
    os.replace(staged, fwd.config_path)


async def reload(session, fwd: ForwarderProcess, config: dict | None = None) -> None:
    """Rewrite the file (if given), SIGHUP, and wait until the daemon has handled it."""
    if config is not None:
        rewrite(fwd, config)
    seen = fwd.logs().count('"reload')
    fwd.signal(signal.SIGHUP)

    async def handled() -> bool:  # reloaded, reload_failed or reload_ignored
        return fwd.logs().count('"reload') > seen
    await wait_for(handled, 10, "the reload to be handled")


async def reload_quietly(session, fwd: ForwarderProcess, config: dict) -> None:
    """SIGHUP for a reload whose own log line may be filtered out (log.level): wait on the effect instead."""
    rewrite(fwd, config)
    fwd.signal(signal.SIGHUP)


async def started(tmp_path, procs, session, emu, **extra) -> tuple[ForwarderProcess, dict]:
    config = process_sections(emu.url, **extra)
    fwd = procs(ForwarderProcess(tmp_path, config))
    await fwd.ready(session)
    return fwd, config


DAMAGE = ["directory", "invalid utf-8", "deleted", "not toml", "deeply nested", "fifo", "huge", "binary"]


def damage_config(path, damage: str) -> None:
    path.unlink()
    if damage == "directory":
        path.mkdir()
    elif damage == "invalid utf-8":
        path.write_bytes(b"[log]\nlevel = \"\xff\"\n")
    elif damage == "not toml":
        path.write_text("[batch\n")
    elif damage == "deeply nested":  # tomllib recursion: RecursionError, not a TOMLDecodeError
        path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    elif damage == "fifo":  # opening it for reading would wait for a writer that never comes
        os.mkfifo(path)
    elif damage == "huge":
        path.write_text("[batch]\nmax_events = 7\n" + "# padding, padding, padding\n" * 100_000)
    elif damage == "binary":
        path.write_bytes(bytes(range(256)) * 64)


@pytest.mark.parametrize("damage", DAMAGE)
async def test_a_reload_that_cannot_use_the_file_is_one_reload_failed_and_the_daemon_keeps_serving(
        tmp_path, procs, session, damage):
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    fwd, config = await started(tmp_path, procs, session, emu)
    damage_config(fwd.config_path, damage)
    fwd.signal(signal.SIGHUP)
    await wait_for(_logged(fwd, '"reload_failed"'), 10, "reload_failed in the log")
    async with session.get(f"http://127.0.0.1:{fwd.port}/healthz") as r:  # the loop is not waiting on a read
        assert r.status == 200
    await post_numbered(session, fwd, 0, 10)
    await wait_for(lambda: queue_empty(session, fwd), 10, "the events to be delivered")
    assert len(await emu.events(session)) == 10
    # The reload path is not wedged either: a good file applies at the next SIGHUP.
    if fwd.config_path.is_dir():
        fwd.config_path.rmdir()
    elif fwd.config_path.exists():
        fwd.config_path.unlink()
    config["batch"]["max_events"] = 7
    await reload(session, fwd, config)
    await wait_for(_logged(fwd, '"reloaded"'), 10, "the next reload")
    assert fwd.popen.poll() is None
    assert fwd.logs().count('"reload_failed"') == 1
    assert "Traceback" not in fwd.logs()


async def test_lowering_batch_max_events_splits_new_batches_only_and_duplicates_nothing(tmp_path, procs, session):
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    fwd, config = await started(tmp_path, procs, session, emu, batch={"max_events": 50, "flush_interval": 5.0})
    await post_numbered(session, fwd, 0, 30)
    config["batch"]["max_events"] = 10
    await reload(session, fwd, config)
    await post_numbered(session, fwd, 30, 50)
    await wait_for(lambda: queue_empty(session, fwd), 20, "the events to be delivered")
    stats = await emu.stats(session)
    assert stats["batch_sizes"] == {"10": 3, "50": 1}
    assert Counter(orjson.loads(e["data"])["i"] for e in await emu.events(session)) == Counter(range(80))


async def test_a_shorter_flush_interval_applies_to_batches_opened_after_the_reload(tmp_path, procs, session):
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    fwd, config = await started(tmp_path, procs, session, emu, batch={"max_events": 50, "flush_interval": 600.0})
    await post_numbered(session, fwd, 0, 1, project="before")
    config["batch"]["flush_interval"] = 0.05
    await reload(session, fwd, config)
    await post_numbered(session, fwd, 1, 1, project="after")

    async def after_delivered() -> bool:
        return len(await emu.events(session, "after")) == 1
    await wait_for(after_delivered, 10, "the batch opened after the reload")
    assert await emu.events(session, "before") == []  # it keeps the deadline it opened with


async def test_a_shorter_max_elapsed_dead_letters_what_has_waited_longer(tmp_path, procs, session):
    emu = procs(EmulatorProcess(tmp_path, "--missing-project", "gone"))
    await emu.ready(session)
    fwd, config = await started(tmp_path, procs, session, emu,
                                retry={"max_elapsed": 600.0, "initial_backoff": 0.05, "max_backoff": 0.5})
    await post_numbered(session, fwd, 0, 20, project="gone")
    await wait_for(_logged(fwd, '"circuit_opened"'), 10, "the project's circuit to open")
    config["retry"]["max_elapsed"] = 1.0
    await reload(session, fwd, config)
    await wait_for(lambda: queue_empty(session, fwd), 15, "the events to be dead-lettered")
    assert len(fwd.dead_letters()) == 20


async def test_a_lower_max_backoff_shortens_the_waits_of_an_open_circuit(tmp_path, procs, session):
    emu = procs(EmulatorProcess(tmp_path, "--missing-project", "gone"))
    await emu.ready(session)
    fwd, config = await started(tmp_path, procs, session, emu,
                                retry={"max_elapsed": 600.0, "initial_backoff": 0.05, "max_backoff": 600.0})
    await post_numbered(session, fwd, 0, 5, project="gone")
    await wait_for(lambda: _calls_at_least(session, emu, 4), 20, "the circuit to back off to 8 s")
    config["retry"]["max_backoff"] = 0.1
    await reload(session, fwd, config)
    # The circuit's next wait was 8 s or more; with max_backoff 0.1 the probes come every 0.1 s.
    await wait_for(lambda: _calls_at_least(session, emu, 25), 20, "probes every max_backoff")


async def test_rates_reloaded_down_and_up_again_restart_from_the_new_initial_rate(tmp_path, procs, session):
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    fwd, config = await started(tmp_path, procs, session, emu, evidently={"initial_rate": 50.0, "max_rate": 100.0})
    assert await fwd.metric(session, "forwarder_send_rate") == 50.0
    config["evidently"].update(initial_rate=0.5, max_rate=0.5)
    await reload(session, fwd, config)
    assert await fwd.metric(session, "forwarder_send_rate") == 0.5
    config["evidently"].update(initial_rate=30.0, max_rate=300.0)
    await reload(session, fwd, config)
    assert await fwd.metric(session, "forwarder_send_rate") == 30.0  # not stuck at 0.5


async def test_log_level_reloads_live(tmp_path, procs, session):
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    fwd, config = await started(tmp_path, procs, session, emu)
    config["log"] = {"level": "warning"}
    await reload_quietly(session, fwd, config)
    config["batch"]["max_events"] = 20
    config["intake"]["max_body_bytes"] = 4096  # needs a restart: a warning, shown at this level
    await reload_quietly(session, fwd, config)
    await wait_for(_logged(fwd, '"config_needs_restart"'), 10, "the second reload's warning")
    assert fwd.logs().count('"reloaded"') == 0  # info lines are filtered from the first reload on
    config["log"] = {"level": "info"}
    await reload(session, fwd, config)
    # The second SIGHUP may still be handled after this third file is written (signals coalesce,
    # reloads read off the loop): what counts is that the reload back to info is logged.
    await wait_for(_logged(fwd, '"applied": ["log.level"]'), 10, "the reload back to info, logged")


def _logged(fwd: ForwarderProcess, text: str):
    async def check() -> bool:
        return text in fwd.logs()
    return check


async def _calls_at_least(session, emu: EmulatorProcess, n: int) -> bool:
    return (await emu.stats(session))["requests_total"] >= n

