"""Child processes of the suite: start, pin to a core, wait until ready, read RSS and CPU.

Everything listens on 127.0.0.1 on free ports. Pinning (``os.sched_setaffinity``
in the child between fork and exec, before it runs anything) keeps a server and
its load generator from trading places between cores on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp

from tests.harness import free_port, to_toml, wait_for

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE = 0  # the process under test
DRIVER_CORE = 1  # load generator, emulator, this orchestrator
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                     "AWS_EC2_METADATA_DISABLED": "true"}


# The cores this run may use, read before the orchestrator pins itself.
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used so far (Linux /proc)."""
    user, system, _ = proc_counters(pid)
    return user + system


def proc_counters(pid: int) -> tuple[float, float, int]:
    """User CPU seconds, system CPU seconds and minor page faults of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, int(fields[7])


def stop_process(popen: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    if popen is not None and popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(5)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)


def pinning() -> bool:
    """Pin only where there are two cores to pin to."""
    return len(CPUS) >= 2


def pinned_to(core: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` pinning the child to ``core`` before it runs anything."""
    if core is None or not pinning():
        return None
    cpu = CPUS[core]
    return lambda: os.sched_setaffinity(0, {cpu})


def pin_self(core: int | None) -> None:
    if core is not None and pinning():
        os.sched_setaffinity(0, {CPUS[core]})


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **BENCH_CREDENTIALS, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


class Child:
    """One long-running child (server, emulator) with its output in ``logdir/name.log``."""

    def __init__(self, name: str, args: list[str], logdir: Path, core: int | None) -> None:
        self.name = name
        self.args = args
        self.log_path = logdir / f"{name}.log"
        self.core = core
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> "Child":
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=child_env(), cwd=ROOT,
                                      preexec_fn=pinned_to(self.core))
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def check_alive(self) -> None:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; "
                               f"last lines of {self.log_path}:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def rss(self) -> int:
        """Resident set size in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.name}")

    def counters(self) -> tuple[float, float, int]:
        """User CPU seconds, system CPU seconds and minor page faults so far."""
        return proc_counters(self.pid)

    def stop(self) -> None:
        stop_process(self.popen)
        if hasattr(self, "_log"):
            self._log.close()


async def wait_http(session: aiohttp.ClientSession, child: Child, url: str, timeout: float = 30.0) -> None:
    """Wait until GET ``url`` answers 200, failing early with the log if the child died."""
    async def up() -> bool:
        child.check_alive()
        try:
            async with session.get(url) as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False
    await wait_for(up, timeout, f"{child.name} at {url}")


async def start_child(session: aiohttp.ClientSession, child: Child, ready_url: str) -> None:
    """Start ``child`` and wait for ``ready_url``; a child that never gets ready is stopped."""
    child.start()
    try:
        await wait_http(session, child, ready_url)
    except BaseException:
        child.stop()
        raise


class Emulator:
    def __init__(self, logdir: Path, *flags: str, core: int | None = DRIVER_CORE, name: str = "emulator") -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.child = Child(name, python("-m", "forwarder", "emulator", "--port", str(self.port), *flags),
                           logdir, core)

    async def start(self, session: aiohttp.ClientSession) -> "Emulator":
        await start_child(session, self.child, f"{self.url}/healthz")
        return self

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.url}/_emulator/stats") as r:
            return await r.json()

    async def accepted(self, session: aiohttp.ClientSession) -> int:
        return int((await self.stats(session))["events_accepted"])

    async def reset(self, session: aiohttp.ClientSession) -> None:
        async with session.post(f"{self.url}/_emulator/reset") as r:
            r.raise_for_status()

    def stop(self) -> None:
        self.child.stop()


def forwarder_sections(logdir: Path, name: str, emulator_url: str, **overrides: dict[str, Any]) -> dict[str, dict]:
    """A bench configuration: the limiter never the bottleneck, a buffer big enough for the run."""
    state = logdir / f"{name}-state"
    sections: dict[str, dict[str, Any]] = {
        "intake": {"host": HOST, "port": free_port()},
        "buffer": {"type": "memory", "path": str(state), "max_events": 5_000_000, "max_bytes": 4 * 2**30},
        "evidently": {"endpoint_url": emulator_url, "concurrency": 8, "max_rate": 100_000.0,
                      "initial_rate": 100_000.0},
        "dead_letter": {"path": str(state / "dead-letter.ndjson")},
        "log": {"level": "warning"},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return sections


class Forwarder:
    """``forwarder run`` (uvloop when importable), or the same ``serve()`` on a chosen loop."""

    def __init__(self, logdir: Path, sections: dict[str, dict], name: str = "forwarder",
                 loop: str | None = None, core: int | None = SERVER_CORE) -> None:
        self.url = f"http://{HOST}:{sections['intake']['port']}"
        config = logdir / f"{name}.toml"
        config.write_text(to_toml(sections))
        args = (python("-m", "forwarder", "run", "--config", str(config)) if loop is None
                else python("-m", "benchmarks.plain_forwarder", "--loop", loop, str(config)))
        self.child = Child(name, args, logdir, core)

    async def start(self, session: aiohttp.ClientSession) -> "Forwarder":
        await start_child(session, self.child, f"{self.url}/readyz")
        return self

    async def metric(self, session: aiohttp.ClientSession, name: str) -> float:
        async with session.get(f"{self.url}/metrics") as r:
            text = await r.text()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def wait_drained(self, session: aiohttp.ClientSession, timeout: float) -> float:
        """Wait until every accepted event is acknowledged; returns the seconds it took."""
        started = time.monotonic()

        async def drained() -> bool:
            self.child.check_alive()
            return await self.metric(session, "forwarder_queue_depth") == 0
        await wait_for(drained, timeout, f"{self.child.name} to deliver its backlog", interval=0.25)
        return time.monotonic() - started

    def stop(self) -> None:
        self.child.stop()


class BareServer:
    def __init__(self, logdir: Path, loop: str = "uvloop", core: int | None = SERVER_CORE,
                 server: str = "app") -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.child = Child(f"bare-aiohttp-{server}", python("-m", "benchmarks.bare_server", "--port", str(self.port),
                                                            "--loop", loop, "--server", server), logdir, core)

    async def start(self, session: aiohttp.ClientSession) -> "BareServer":
        await start_child(session, self.child, f"{self.url}/healthz")
        return self

    def stop(self) -> None:
        self.child.stop()


async def run_json(args: list[str], core: int | None, timeout: float) -> dict[str, Any]:
    """Run a worker to completion; its last stdout line is its JSON result."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=child_env(), cwd=ROOT,
                                                preexec_fn=pinned_to(core))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{' '.join(args[:4])} did not finish within {timeout}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} exited with {proc.returncode}:\n{err.decode()[-3000:]}")
    lines = out.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(args[:4])} printed nothing:\n{err.decode()[-3000:]}")
    return json.loads(lines[-1])
