"""Real processes for end-to-end tests: ``forwarder emulator`` and ``forwarder run``.

Everything listens on 127.0.0.1 on free ports. Waiting is always for a
condition with a deadline (``wait_for``), never a bare sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import orjson

from forwarder.config import to_toml

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str,
                   interval: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def answers_200(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


class Proc:
    """A child process with its output in a file, stopped on close."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                      stdin=subprocess.DEVNULL)

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.args[3:5]} did not exit within {timeout}s")
            await asyncio.sleep(0.02)
        return self.popen.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        if hasattr(self, "_log"):
            self._log.close()


def forwarder_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "forwarder", *args]


class EmulatorProcess(Proc):
    """``forwarder emulator`` in its own process, driven over its control API."""

    def __init__(self, tmp: Path, *flags: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        super().__init__(forwarder_command("emulator", "--port", str(self.port), *flags),
                         tmp / f"emulator-{self.port}.log")

    async def ready(self, session: aiohttp.ClientSession, timeout: float = 20.0) -> None:
        await wait_for(lambda: answers_200(session, f"{self.url}/healthz"), timeout, f"the emulator on {self.url}")

    async def configure(self, session: aiohttp.ClientSession, **fields: Any) -> dict:
        async with session.post(f"{self.url}/_emulator/config", json=fields) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def events(self, session: aiohttp.ClientSession, project: str | None = None) -> list[dict]:
        params = {"project": project} if project else {}
        async with session.get(f"{self.url}/_emulator/events", params=params) as r:
            return (await r.json(loads=orjson.loads))["events"]

    async def stats(self, session: aiohttp.ClientSession) -> dict:
        async with session.get(f"{self.url}/_emulator/stats") as r:
            return await r.json()


class ForwarderProcess(Proc):
    """``forwarder run`` with a generated TOML configuration."""

    def __init__(self, tmp: Path, sections: dict[str, dict[str, Any]], env: dict[str, str] | None = None,
                 name: str = "forwarder") -> None:
        self.port = sections.setdefault("intake", {}).setdefault("port", free_port())
        self.url = f"http://{HOST}:{self.port}"
        sections["intake"].setdefault("host", HOST)
        state = tmp / f"{name}-state"
        sections.setdefault("buffer", {}).setdefault("path", str(state))
        sections.setdefault("dead_letter", {}).setdefault("path", str(state / "dead-letter.ndjson"))
        sections.setdefault("log", {}).setdefault("level", "info")
        self.config_path = tmp / f"{name}.toml"
        self.config_path.write_text(to_toml(sections))
        self.dead_letter_path = Path(sections["dead_letter"]["path"])
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_EC2_METADATA_DISABLED": "true", **(env or {})}
        super().__init__(forwarder_command("run", "--config", str(self.config_path)), tmp / f"{name}.log", env)

    async def ready(self, session: aiohttp.ClientSession, timeout: float = 20.0) -> None:
        async def up() -> bool:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise AssertionError(f"forwarder exited with {self.popen.returncode}:\n{self.logs()}")
            return await answers_200(session, f"{self.url}/readyz")
        await wait_for(up, timeout, f"the forwarder on {self.url}")

    async def post(self, session: aiohttp.ClientSession, project: str, events: list[dict]) -> tuple[int, dict]:
        async with session.post(f"{self.url}/events/projects/{project}",
                                data=orjson.dumps({"events": events}),
                                headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json(loads=orjson.loads, content_type=None)

    async def metric(self, session: aiohttp.ClientSession, name: str, labels: str = "") -> float:
        """One sample of /metrics, e.g. metric(s, "forwarder_events_sent_total")."""
        async with session.get(f"{self.url}/metrics") as r:
            text = await r.text()
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def dead_letters(self) -> list[dict]:
        if not self.dead_letter_path.exists():
            return []
        return [orjson.loads(line) for line in self.dead_letter_path.read_bytes().splitlines() if line.strip()]

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)
