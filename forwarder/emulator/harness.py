"""Real processes for tests and benchmarks: ``forwarder emulator`` and ``forwarder run``.

The one process harness of tests/ and benchmarks/ (the daemon never imports
it). Everything listens on 127.0.0.1 on free ports. Waiting is always for a
condition with a deadline (``wait_for``), never a bare sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Self

import aiohttp
import orjson

from forwarder.config import to_toml

HOST = "127.0.0.1"
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}


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


async def answers_200(session: aiohttp.ClientSession, url: str, tls: ssl.SSLContext | bool = True) -> bool:
    try:
        async with session.get(url, ssl=tls) as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


def forwarder_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "forwarder", *args]


class Proc:
    """A child process with its output in ``log_path``, ready once ``health_url`` answers 200.

    ``stop()`` kills at once by default (tests); with ``stop_grace`` it sends
    SIGTERM first and kills only after that many seconds (benchmarks).
    ``preexec_fn`` runs in the child before it starts (e.g. pinning to a core).
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None, *,
                 name: str | None = None, health_url: str | None = None, cwd: Path | None = None,
                 preexec_fn: Callable[[], None] | None = None, stop_grace: float = 0.0) -> None:
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.name = name or log_path.stem
        self.health_url = health_url
        self.tls: ssl.SSLContext | bool = True  # how requests to health_url verify TLS
        self.cwd = cwd
        self.preexec_fn = preexec_fn
        self.stop_grace = stop_grace
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                      stdin=subprocess.DEVNULL, cwd=self.cwd, preexec_fn=self.preexec_fn)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def check_alive(self) -> None:
        """Fail with the end of the log when the process has exited."""
        assert self.popen is not None, f"{self.name} was not started"
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}; "
                                 f"last lines of {self.log_path}:\n{self.tail()}")

    async def ready(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        """Wait until ``health_url`` answers 200, failing early with the log if the process died."""
        assert self.health_url is not None, f"{self.name} has no health URL"
        url = self.health_url

        async def up() -> bool:
            self.check_alive()
            return await answers_200(session, url, self.tls)
        await wait_for(up, timeout, f"{self.name} at {url}")

    async def launch(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> Self:
        """Start and wait until ready; a process that never gets ready is stopped."""
        self.start()
        try:
            await self.ready(session, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def signal(self, sig: int) -> None:
        assert self.popen is not None, f"{self.name} was not started"
        self.popen.send_signal(sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> int:
        """The exit code, once the process has exited; fails after ``timeout`` seconds."""
        assert self.popen is not None, f"{self.name} was not started"
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not exit within {timeout}s")
            await asyncio.sleep(0.02)
        return self.popen.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.logs().splitlines()[-n:])

    def rss(self) -> int:
        """Resident set size in bytes (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.name}")

    def stop(self) -> None:
        """Stop the process (see the class docstring); safe to call more than once."""
        popen = self.popen
        if popen is not None and popen.poll() is None:
            if self.stop_grace > 0:
                popen.terminate()
                try:
                    popen.wait(self.stop_grace)
                except subprocess.TimeoutExpired:
                    pass
            if popen.poll() is None:
                popen.kill()
                popen.wait(10)
        if hasattr(self, "_log"):
            self._log.close()


# --- the emulator ----------------------------------------------------------


async def emulator_events(session: aiohttp.ClientSession, emulator_url: str,
                          project: str | None = None) -> list[dict]:
    """The events an emulator (a process or in-process) has recorded, in arrival order."""
    params = {"project": project} if project else {}
    async with session.get(f"{emulator_url}/_emulator/events", params=params) as r:
        assert r.status == 200, await r.text()
        return (await r.json(loads=orjson.loads))["events"]


async def emulator_stats(session: aiohttp.ClientSession, emulator_url: str) -> dict[str, Any]:
    async with session.get(f"{emulator_url}/_emulator/stats") as r:
        assert r.status == 200, await r.text()
        return await r.json(loads=orjson.loads)


async def delivered(session: aiohttp.ClientSession, emulator_url: str, at_least: int, timeout: float,
                    project: str | None = None) -> list[dict]:
    """The emulator's recorded events once it has accepted at least ``at_least`` events."""
    async def enough() -> bool:
        return (await emulator_stats(session, emulator_url))["events_accepted"] >= at_least
    await wait_for(enough, timeout, f"{at_least} events at the emulator")
    return await emulator_events(session, emulator_url, project)


class EmulatorProcess(Proc):
    """``forwarder emulator`` in its own process, driven over its control API."""

    def __init__(self, logdir: Path, *flags: str, port: int | None = None, name: str = "emulator",
                 **proc: Any) -> None:
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        super().__init__(forwarder_command("emulator", "--port", str(self.port), *flags),
                         logdir / f"{name}-{self.port}.log", name=name, health_url=f"{self.url}/healthz", **proc)

    async def configure(self, session: aiohttp.ClientSession, **fields: Any) -> dict:
        async with session.post(f"{self.url}/_emulator/config", json=fields) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def events(self, session: aiohttp.ClientSession, project: str | None = None) -> list[dict]:
        return await emulator_events(session, self.url, project)

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        return await emulator_stats(session, self.url)

    async def accepted(self, session: aiohttp.ClientSession) -> int:
        """Events accepted so far (counted whether or not the emulator records them)."""
        return int((await self.stats(session))["events_accepted"])

    async def reset(self, session: aiohttp.ClientSession) -> None:
        async with session.post(f"{self.url}/_emulator/reset") as r:
            assert r.status == 200, await r.text()


# --- the forwarder ---------------------------------------------------------


def parse_metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition; AssertionError naming it when there is none."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    near = [line for line in text.splitlines() if line.startswith(name)]
    raise AssertionError(f"no series {wanted} in /metrics; series of that name: {near or 'none'}")


class ForwarderProcess(Proc):
    """``forwarder run`` (or ``command(config_path)``) with a generated TOML configuration."""

    def __init__(self, logdir: Path, sections: dict[str, dict[str, Any]], env: dict[str, str] | None = None,
                 name: str = "forwarder", command: Callable[[Path], list[str]] | None = None,
                 tls: ssl.SSLContext | None = None, **proc: Any) -> None:
        """``tls``: a client context trusting the intake's certificate (intake.tls_cert_file); URLs become https."""
        self.port = sections.setdefault("intake", {}).setdefault("port", free_port())
        self.url = f"{'https' if tls else 'http'}://{HOST}:{self.port}"
        sections["intake"].setdefault("host", HOST)
        state = logdir / f"{name}-state"
        sections.setdefault("buffer", {}).setdefault("path", str(state))
        sections.setdefault("dead_letter", {}).setdefault("path", str(state / "dead-letter.ndjson"))
        sections.setdefault("log", {}).setdefault("level", "info")
        self.config_path = logdir / f"{name}.toml"
        self.config_path.write_text(to_toml(sections))
        self.dead_letter_path = Path(sections["dead_letter"]["path"])
        args = (command or _run)(self.config_path)
        super().__init__(args, logdir / f"{name}.log", {**TEST_CREDENTIALS, **(env or {})}, name=name,
                         health_url=f"{self.url}/readyz", **proc)
        self.tls = tls or True

    async def post(self, session: aiohttp.ClientSession, project: str, events: list[dict]) -> tuple[int, dict]:
        async with session.post(f"{self.url}/events/projects/{project}",
                                data=orjson.dumps({"events": events}),
                                headers={"Content-Type": "application/json"}, ssl=self.tls) as r:
            return r.status, await r.json(loads=orjson.loads, content_type=None)

    async def metric(self, session: aiohttp.ClientSession, name: str, labels: str = "") -> float:
        """One series of /metrics, e.g. metric(s, "forwarder_events_sent_total"); fails if it does not exist."""
        async with session.get(f"{self.url}/metrics", ssl=self.tls) as r:
            return parse_metric(await r.text(), name, labels)

    async def wait_drained(self, session: aiohttp.ClientSession, timeout: float) -> float:
        """Wait until every accepted event is acknowledged; returns the seconds it took."""
        started = time.monotonic()

        async def drained() -> bool:
            self.check_alive()
            return await self.metric(session, "forwarder_queue_depth") == 0
        await wait_for(drained, timeout, f"{self.name} to deliver its backlog", interval=0.25)
        return time.monotonic() - started

    def dead_letters(self) -> list[dict]:
        if not self.dead_letter_path.exists():
            return []
        return [orjson.loads(line) for line in self.dead_letter_path.read_bytes().splitlines() if line.strip()]


def _run(config_path: Path) -> list[str]:
    return forwarder_command("run", "--config", str(config_path))
