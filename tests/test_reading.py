"""Files the daemon reads at start and on reload: bounded in size, refused unless regular, read off the loop
under a time limit."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import structlog

from forwarder.config import IntakeConfig
from forwarder.intake.auth import TokenAuthenticator
from forwarder.intake.listeners import ListenerError, TlsCertificates
from forwarder.reading import FileRefused, OffLoop, ReadTimeout, read_bounded
from tests import support
from tests.tools import make_ca_and_server_pair

TOKEN_A = "a" * 32
TOKEN_B = "b" * 32


def test_a_fifo_without_a_writer_is_refused_at_once(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(FileRefused, match="is not a regular file but a FIFO"):
        read_bounded(path, 1024)


def test_a_file_over_the_limit_is_refused_and_one_within_it_read_whole(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1025)
    with pytest.raises(FileRefused, match=r"is larger than 1024 bytes \(1025 bytes\)"):
        read_bounded(path, 1024)
    path.write_bytes(b"x" * 1024)
    assert read_bounded(path, 1024) == b"x" * 1024


def test_a_device_read_as_a_stream_is_still_bounded():
    with pytest.raises(FileRefused, match="is larger than 1024 bytes"):
        read_bounded("/dev/zero", 1024, regular_only=False)
    with pytest.raises(FileRefused, match="a device"):
        read_bounded("/dev/zero", 1024)


def test_a_directory_is_said_to_be_one(tmp_path):
    with pytest.raises(IsADirectoryError):
        read_bounded(tmp_path, 1024)


async def test_a_read_that_does_not_finish_in_time_is_given_up_and_the_next_refused_until_it_ends():
    stuck = threading.Event()
    reads = OffLoop("the test file", timeout=0.05)
    with pytest.raises(ReadTimeout, match="the test file: reading did not finish within 0.05 s"):
        await reads.run(stuck.wait)
    with pytest.raises(ReadTimeout, match="the previous reading has not finished yet"):
        await reads.run(lambda: "never started")
    stuck.set()
    for _ in range(100):  # the abandoned thread ends; then the file is read again
        try:
            assert await reads.run(lambda: "read") == "read"
            break
        except ReadTimeout:
            await asyncio.sleep(0.01)
    else:
        pytest.fail("the reader stayed busy after its thread ended")


async def test_an_error_in_the_thread_is_raised_to_the_caller():
    def fail() -> None:
        raise RecursionError("maximum recursion depth exceeded")

    with pytest.raises(RecursionError):
        await OffLoop("x").run(fail)


async def test_the_event_loop_keeps_running_while_a_file_is_read():
    release = threading.Event()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while not release.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.ensure_future(tick())

    def slow() -> str:
        release.wait(5)
        return "done"

    reading = asyncio.ensure_future(OffLoop("x").run(slow))
    while ticks < 5:
        await asyncio.sleep(0.001)
    release.set()
    assert await reading == "done"
    await ticker


@pytest.mark.parametrize("damage, cause", [
    ("fifo", "is not a regular file but a FIFO"),
    ("huge", "is larger than 1 MiB"),
    ("binary", "is not UTF-8 text"),
])
async def test_a_token_file_that_cannot_be_used_on_reload_keeps_the_tokens_in_force(tmp_path, damage, cause):
    path = tmp_path / "tokens"
    path.write_text(TOKEN_A + "\n")
    obs = support.observer()
    check = TokenAuthenticator(str(path), obs)
    path.unlink()
    if damage == "fifo":
        os.mkfifo(path)
    elif damage == "huge":
        path.write_text((TOKEN_B + "\n") * 40_000)
    else:
        path.write_bytes(b"\xff\xfe\x00" * 100)
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(check.reconfigure(IntakeConfig()), 2.0)
    assert check.matches(TOKEN_A)
    assert [e["event"] for e in logs] == ["reload_failed"] and cause in logs[0]["error"]
    assert obs.metrics.registry.get_sample_value("forwarder_intake_auth_reload_errors_total") == 1


async def test_a_fifo_in_place_of_the_certificate_keeps_the_pair_in_use(tmp_path):
    _, cert, key = make_ca_and_server_pair(tmp_path)
    certificates = TlsCertificates(str(cert), str(key))
    before = certificates._current
    cert.unlink()
    os.mkfifo(cert)
    with pytest.raises(ListenerError, match="intake.tls_cert_file: .* is not a regular file but a FIFO"):
        await asyncio.wait_for(certificates.reconfigure(IntakeConfig()), 2.0)
    assert certificates._current is before
