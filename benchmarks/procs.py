"""The suite's child processes: the shared harness (forwarder.emulator.harness), pinned to a core, bench settings.

Pinning (``os.sched_setaffinity`` in the child between fork and exec, before it
runs anything) keeps a server and its load generator from trading places
between cores on a 2-core machine. Children stop with SIGTERM, killed after 5 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any, Callable

from forwarder.emulator.harness import HOST, EmulatorProcess, ForwarderProcess, Proc, free_port

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE = 0  # the process under test
DRIVER_CORE = 1  # load generator, emulator, this orchestrator
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                     "AWS_EC2_METADATA_DISABLED": "true"}
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL


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


def _bench_child(core: int | None) -> dict[str, Any]:
    """How the suite runs a child: its environment and working directory, pinned, stopped gracefully."""
    return {"env": child_env(), "cwd": ROOT, "preexec_fn": pinned_to(core), "stop_grace": STOP_GRACE}


def emulator(logdir: Path, *flags: str, core: int | None = DRIVER_CORE, name: str = "emulator") -> EmulatorProcess:
    """``forwarder emulator`` with ``flags``, on the driver core unless told otherwise."""
    return EmulatorProcess(logdir, *flags, name=name, **_bench_child(core))


def forwarder(logdir: Path, sections: dict[str, dict], name: str = "forwarder", loop: str | None = None,
              core: int | None = SERVER_CORE, tls: ssl.SSLContext | None = None) -> ForwarderProcess:
    """``forwarder run`` (uvloop when importable), or the same ``serve()`` on a chosen loop; ``tls``: a context
    trusting its intake's certificate (intake.tls_cert_file)."""
    def plain(config: Path) -> list[str]:
        return python("-m", "benchmarks.plain_forwarder", "--loop", str(loop), str(config))
    return ForwarderProcess(logdir, sections, name=name, command=None if loop is None else plain, tls=tls,
                            **_bench_child(core))


class BareServer(Proc):
    """The bare aiohttp server the intake is compared with."""

    def __init__(self, logdir: Path, loop: str = "uvloop", core: int | None = SERVER_CORE,
                 server: str = "app") -> None:
        port = free_port()
        self.url = f"http://{HOST}:{port}"
        super().__init__(python("-m", "benchmarks.bare_server", "--port", str(port), "--loop", loop,
                                "--server", server),
                         logdir / f"bare-aiohttp-{server}.log", health_url=f"{self.url}/healthz",
                         **_bench_child(core))


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
