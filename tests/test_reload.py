"""The reload walk: every live key the daemon's stages declare changes what its stage does, and nothing a
reload meets (a stage that raises, a file that cannot be used) ends it or half-applies it."""

from __future__ import annotations

import asyncio
import io
import random
from typing import Any, Callable

import orjson
import pytest
import structlog
from prometheus_client import CollectorRegistry

from forwarder.app import Forwarder, Logging
from forwarder.buffer.memory import MemoryBuffer
from forwarder.clock import Clock
from forwarder.config import Config, from_dict, to_toml
from forwarder.delivery.batcher import Batcher, FlushLoop
from forwarder.delivery.rate import SHIPPED_CONTROLLERS, RateLimiter
from forwarder.delivery.retry import CallResult
from forwarder.delivery.sender import Sender
from forwarder.observability import configure_logging
from forwarder.reload import Reload, live_table
from tests.fakes import DeadLetters, Ledger, RecordingSink, Scripted, VirtualTime
from tests import support


def daemon_table() -> dict[str, str]:
    """The daemon's table of live keys, built by its composition root from what the stages declare."""
    return Forwarder(from_dict({}, {}), registry=CollectorRegistry(), process_metrics=False).live_keys()


TABLE = daemon_table()


class Inline:
    """Reads the configuration file on the loop's thread: virtual time must not run past a real thread."""

    async def run(self, work: Callable[[], Any]) -> Any:
        return work()


class Log:
    """A logger that records (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.lines.append((level, event, fields))

    def events(self, level: str | None = None) -> list[str]:
        return [event for lvl, event, _ in self.lines if level in (None, lvl)]


# Each rig builds one stage the way the daemon does, on virtual time, and measures what it does.

class FlushRig:
    """The flush loop: the sizes of the batches 120 events make, and when each was handed on."""

    def __init__(self, config: Config, vt: VirtualTime) -> None:
        self.vt = vt
        self.buffer = MemoryBuffer(config.buffer, support.observer())
        self.sink = RecordingSink()
        self.stage = FlushLoop(self.buffer, Batcher(config.batch, vt.time, vt.wall), self, support.observer(), vt.time)
        self.sent: list[tuple[int, float]] = []
        self.stage.start(pytest.fail)

    async def send(self, batch: Any) -> None:
        self.sent.append((len(batch.events), self.vt.time()))

    async def measure(self) -> Any:
        start = self.vt.time()
        await self.buffer.append("p", support.events(120), self.vt.wall())
        while sum(n for n, _ in self.sent) < 120:
            await asyncio.sleep(0.01)
        return [(n, round(t - start, 3)) for n, t in self.sent]


class SenderRig:
    """The sender against a scripted Evidently: the instants of its calls and how the batch ended."""

    def __init__(self, config: Config, vt: VirtualTime, answer: Callable[[int], CallResult]) -> None:
        self.vt = vt
        self.transport = Scripted(lambda n, project, sent: answer(n), vt.time)
        self.ledger = Ledger(vt.wall)
        self.dead = DeadLetters()
        limiter = RateLimiter(100_000.0, 100_000.0, clock=vt.time)
        self.stage = Sender(self.transport, self.ledger, self.dead, limiter, support.observer(), config.retry, 1,
                            Clock(vt.time, vt.wall, random.Random(7)))

    async def measure(self) -> Any:
        await self.stage.start(pytest.fail)
        start = self.vt.time()
        await self.stage.send(self.ledger.batch("p", support.events(5)))
        assert await self.stage.drain(7200.0)
        await self.stage.close()
        return [round(t - start, 6) for _, _, t in self.transport.calls], len(self.dead.entries)


class RateRig:
    """The rate limiter: the instants at which 60 calls, each a success, get their turn."""

    def __init__(self, config: Config, vt: VirtualTime) -> None:
        self.vt = vt
        ev = config.evidently
        self.stage = RateLimiter(ev.effective_initial_rate, ev.effective_max_rate,
                                 SHIPPED_CONTROLLERS[ev.rate_controller], vt.time)

    async def measure(self) -> Any:
        start = self.vt.time()
        turns = []
        for _ in range(60):
            await self.stage.acquire()
            self.stage.on_success()
            turns.append(round(self.vt.time() - start, 6))
        return turns


class LogRig:
    """The log stage: which of an info and a warning line are written."""

    def __init__(self, config: Config, vt: VirtualTime) -> None:
        self.stream = io.StringIO()
        configure_logging(config.log.level, config.log.format, self.stream)  # as `forwarder run` does at start
        self.stage = Logging(self.stream)

    async def measure(self) -> Any:
        log = structlog.get_logger("probe")
        log.info("probe_info")
        log.warning("probe_warning")
        return [orjson.loads(line)["event"] for line in self.stream.getvalue().splitlines()
                if "probe_" in line]


DOWN = CallResult(503, "ServiceUnavailableException", "down")
THROTTLED = CallResult(400, "ThrottlingException", "slow down")
MISSING = CallResult(404, "ResourceNotFoundException", "Project p does not exist")


def throttled_then_ok(times: int) -> Callable[[int], CallResult]:
    return lambda n: THROTTLED if n < times else CallResult(200)


# key -> (the base configuration, the value the reload brings, the rig that measures the key's stage)
Rig = Callable[[Config, VirtualTime], Any]
PROBES: dict[str, tuple[dict[str, Any], Any, Rig]] = {
    "log.level": ({}, "warning", LogRig),
    "batch.max_events": ({"batch": {"max_events": 50, "flush_interval": 1.0}}, 10, FlushRig),
    "batch.flush_interval": ({"batch": {"max_events": 50, "flush_interval": 1.0}}, 5.0, FlushRig),
    "retry.max_elapsed": ({"retry": {"max_elapsed": 600.0, "initial_backoff": 0.1, "max_backoff": 2.0}}, 5.0,
                          lambda c, vt: SenderRig(c, vt, lambda n: DOWN)),
    "retry.initial_backoff": ({"retry": {"initial_backoff": 0.01, "max_backoff": 20.0}}, 2.0,
                              lambda c, vt: SenderRig(c, vt, throttled_then_ok(4))),
    "retry.max_backoff": ({"retry": {"initial_backoff": 0.5, "max_backoff": 20.0}}, 0.5,
                          lambda c, vt: SenderRig(c, vt, throttled_then_ok(6))),
    "retry.not_found_grace": ({"retry": {"not_found_grace": 60.0, "initial_backoff": 0.1, "max_backoff": 2.0}}, 5.0,
                              lambda c, vt: SenderRig(c, vt, lambda n: MISSING)),
    "evidently.initial_rate": ({"evidently": {"initial_rate": 10.0, "max_rate": 100.0}}, 2.0, RateRig),
    "evidently.max_rate": ({"evidently": {"initial_rate": 10.0, "max_rate": 100.0}}, 20.0, RateRig),
}


def with_key(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    section, name = key.split(".")
    return {**raw, section: {**raw.get(section, {}), name: value}}


@pytest.fixture(autouse=True)
def plain_logging():
    yield
    structlog.reset_defaults()


def test_every_live_key_has_a_probe_and_every_probe_a_live_key():
    assert set(PROBES) == set(TABLE)


@pytest.mark.parametrize("key", sorted(TABLE))
async def test_reloading_a_live_key_changes_what_its_stage_does(key, tmp_path, virtual_time):
    raw, value, rig = PROBES[key]
    base, changed = from_dict(raw, {}), from_dict(with_key(raw, key, value), {})
    path = tmp_path / "forwarder.toml"
    path.write_text(to_toml(base))

    untouched = rig(base, virtual_time)  # the same stage, reloaded with nothing changed
    reload = Reload(base, str(path), lambda: [untouched.stage], Log(), reads=Inline())
    await reload.reload()
    before = await untouched.measure()

    reloaded = rig(base, virtual_time)
    assert type(reloaded.stage).__name__ == TABLE[key]  # the probe drives the stage that declares the key
    log = Log()
    reload = Reload(base, str(path), lambda: [reloaded.stage], log, reads=Inline())
    path.write_text(to_toml(changed))
    await reload.reload()
    assert log.events("error") == []
    assert [fields["applied"] for _, event, fields in log.lines if event == "reloaded"] == [[key]]
    after = await reloaded.measure()

    assert before == await rig(base, virtual_time).measure()  # what is measured is not chance
    assert after != before


class Raising:
    LIVE_KEYS = ("batch.max_events",)

    async def reconfigure(self, batch: Any) -> None:
        raise RuntimeError("a bug in a stage")


class Recording:
    LIVE_KEYS = ("batch.flush_interval",)

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def reconfigure(self, batch: Any) -> None:
        self.seen.append(batch.flush_interval)


async def test_a_stage_that_raises_is_one_reload_failed_and_keeps_its_keys_while_the_others_apply(tmp_path):
    path = tmp_path / "forwarder.toml"
    path.write_text(to_toml(from_dict({"batch": {"max_events": 20, "flush_interval": 3.0}}, {})))
    recording, log = Recording(), Log()
    reload = Reload(from_dict({}, {}), str(path), lambda: [Raising(), recording], log, reads=Inline())
    config = await reload.reload()
    assert log.events("error") == ["reload_failed"]
    failed = next(fields for _, event, fields in log.lines if event == "reload_failed")
    assert failed["keys"] == ["batch.max_events"] and failed["error"] == "RuntimeError: a bug in a stage"
    assert recording.seen == [3.0]
    assert (config.batch.max_events, config.batch.flush_interval) == (50, 3.0)


@pytest.mark.parametrize("damage, cause", [
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nests arrays or inline tables too deeply"),
    ("[batch]\nmax_events = 7\n" + "# padding\n" * 200_000, "is larger than 1 MiB"),
    (b"\x00\xff\xfe binary \x80\x81", "is not UTF-8 text"),
    ("[retry]\nmax_backoff = 1e300\n", "retry.max_backoff must be between 0.001 and 3600 seconds, got 1e+300"),
])
async def test_a_configuration_that_cannot_be_used_is_one_reload_failed_and_changes_nothing(tmp_path, damage,
                                                                                             cause):
    path = tmp_path / "forwarder.toml"
    (path.write_bytes if isinstance(damage, bytes) else path.write_text)(damage)
    recording, log = Recording(), Log()
    start = from_dict({}, {})
    reload = Reload(start, str(path), lambda: [recording], log)
    assert await reload.reload() is start
    assert log.events("error") == ["reload_failed"]
    assert cause in log.lines[0][2]["error"]
    assert recording.seen == [] and "reloaded" not in log.events()


async def test_the_files_of_a_stage_are_re_read_on_every_reload_even_when_the_configuration_cannot_be(tmp_path):
    class Files:
        LIVE_KEYS = ()
        FILE_KEYS = ("intake.token_file",)

        def __init__(self) -> None:
            self.reads = 0

        async def reconfigure(self, intake: Any) -> None:
            self.reads += 1

    path = tmp_path / "forwarder.toml"
    path.write_text("[batch\n")
    files, log = Files(), Log()
    reload = Reload(from_dict({}, {}), str(path), lambda: [files], log, reads=Inline())
    await reload.reload()
    await reload.reload_files()
    assert files.reads == 2
    assert log.events("error") == ["reload_failed"]  # the configuration's, once


def test_a_key_declared_live_by_two_stages_or_naming_no_key_is_refused():
    class Other(Raising):
        pass

    with pytest.raises(ValueError, match="batch.max_events is declared live by both Raising and Other"):
        live_table([Raising(), Other()])

    class Typo:
        LIVE_KEYS = ("batch.max_event",)

    with pytest.raises(ValueError, match="batch.max_event, which is no configuration key"):
        live_table([Typo()])

    class Straddling:
        LIVE_KEYS = ("batch.max_events", "retry.max_elapsed")

    with pytest.raises(ValueError, match="exactly one section"):
        live_table([Straddling()])


async def test_a_stop_during_a_reload_does_not_wait_for_it():
    from forwarder.lifecycle import Signals

    signals = Signals(Log())
    blocked = asyncio.Event()

    async def reload() -> None:
        await blocked.wait()

    waiting = asyncio.ensure_future(signals.unless_stopped(reload()))
    await asyncio.sleep(0)
    signals.stop_requested()
    await asyncio.wait_for(waiting, 1.0)



def test_the_files_a_reload_re_reads_are_those_the_stages_name(tmp_path):
    from forwarder.intake.listeners import TlsCertificates
    from tests.tools import make_ca_and_server_pair

    _, cert, key = make_ca_and_server_pair(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("t" * 32 + "\n")
    config = from_dict({"intake": {"tls_cert_file": str(cert), "tls_key_file": str(key), "auth": "token",
                                   "token_file": str(tokens)},
                        "dead_letter": {"path": str(tmp_path / "dl.ndjson")}}, {})
    fwd = Forwarder(config, registry=CollectorRegistry(), process_metrics=False)
    tls = TlsCertificates(str(cert), str(key))
    stages = [*fwd.live_stages(), tls]  # the listener's certificates exist once it listens
    assert Reload(config, None, lambda: stages, Log()).files() == [str(tokens), str(cert), str(key)]
