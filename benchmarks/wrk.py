"""Driving wrk (Debian's package) with a Lua script that posts a fixed body.

wrk's ``done`` hook prints one JSON line with the counts and latency percentiles,
so nothing is scraped from its human-readable report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.procs import run_json

SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%(headers)swrk.body = [==[%(body)s]==]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%%d,"duration_us":%%d,"status_errors":%%d,"socket_errors":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def available() -> str | None:
    return shutil.which("wrk")


def write_script(path: Path, body: bytes, headers: dict[str, str] | None = None) -> Path:
    """A script posting ``body`` with ``headers`` (e.g. a pre-signed Authorization) on every request."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("body cannot be embedded in a Lua long string")
    lines = "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in (headers or {}).items())
    path.write_text(SCRIPT % {"body": text, "headers": lines})
    return path


async def run(url: str, script: Path, connections: int, duration: float, core: int | None) -> dict:
    """One wrk run on one thread; requests/s counts only 2xx/3xx answers."""
    seconds = max(1, round(duration))
    result = await run_json([available() or "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                             "-s", str(script), url], core, timeout=seconds + 30)
    elapsed = result["duration_us"] / 1e6
    errors = result["status_errors"] + result["socket_errors"]
    ok = result["requests"] - result["status_errors"]
    return {"requests": result["requests"], "ok": ok, "errors": errors, "seconds": elapsed, "rps": ok / elapsed,
            "p50_ms": result["p50_us"] / 1e3, "p99_ms": result["p99_us"] / 1e3}
