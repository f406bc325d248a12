from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from forwarder.emulator.server import Emulator
from tests.fakes import VirtualTime
from forwarder.emulator.harness import EmulatorProcess


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


@pytest.fixture
async def virtual_time() -> AsyncIterator[VirtualTime]:
    """The test's event loop on virtual time (see VirtualTime); for tests without real I/O."""
    vt = VirtualTime(asyncio.get_running_loop())
    try:
        yield vt
    finally:
        vt.restore()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """An in-process emulator on a free port."""
    emu = Emulator()
    await emu.start("127.0.0.1", 0)
    try:
        yield emu
    finally:
        await emu.close()


@pytest.fixture
def procs(tmp_path: Path):
    """Processes a test starts; all killed at the end, logs kept in tmp_path."""
    started = []

    def track(proc):
        started.append(proc)
        proc.start()
        return proc

    yield track
    for proc in started:
        proc.stop()


@pytest.fixture
async def emulator_process(tmp_path: Path, procs, session) -> EmulatorProcess:
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    return emu


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs mounted for the test; skipped where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
