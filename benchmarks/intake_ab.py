"""The intake of this checkout against another source tree's, in one process, alternating fast.

    git archive <commit> | tar -x -C /tmp/base
    python -m benchmarks.intake_ab --baseline /tmp/base [--events 1] [--rounds 30] [--window 1]

With each side in its own ``forwarder run`` (as intake_bench.py does), the
noise between windows on a shared machine swamps a few microseconds per
request. Here both forwarders run in this one process and event loop (uvloop
when importable), each with a transport that acknowledges every batch at once,
and wrk (one thread, 32 connections, on the other core) alternates between them
in short windows; CPU per request is this process's CPU time over each window.
Both sides see the same machine within a second of each other. Prints one JSON
line with medians and ratios (this checkout / baseline)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry

from benchmarks import stats, workload, wrk
from benchmarks.procs import DRIVER_CORE, SERVER_CORE, pin_self
from forwarder.app import Forwarder
from forwarder.config import from_dict
from forwarder.delivery.retry import CallResult

PATH = f"/events/projects/{workload.PROJECT}"


class Acknowledging:
    """A transport that acknowledges every batch without I/O: the same for both sides."""

    async def put_events(self, project: str, events: list[bytes]) -> CallResult:
        return CallResult(200)


def baseline_forwarder(source: Path, scratch: Path) -> type:
    """The Forwarder class of ``source``, imported as package ``forwarder_baseline``."""
    shutil.copytree(source / "forwarder", scratch / "forwarder_baseline")
    sys.path.insert(0, str(scratch))
    return importlib.import_module("forwarder_baseline.app").Forwarder


def config(raw_from_dict, logdir: Path, name: str):  # type: ignore[no-untyped-def]
    return raw_from_dict({
        "intake": {"port": 0},
        "buffer": {"max_events": 20_000_000, "max_bytes": 16 * 2**30},
        "evidently": {"max_rate": 100_000.0, "initial_rate": 100_000.0, "concurrency": 8,
                      "endpoint_url": "http://127.0.0.1:9"},
        "dead_letter": {"path": str(logdir / f"{name}-dead-letter.ndjson")},
        "log": {"level": "warning"},
    }, {})


async def compare(baseline: Path, events: int, rounds: int, window: float, logdir: Path) -> dict:
    logdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        base_class = baseline_forwarder(baseline, Path(scratch))
        base_from_dict = importlib.import_module("forwarder_baseline.config").from_dict
        sides = {
            "baseline": base_class(config(base_from_dict, logdir, "baseline"), transport=Acknowledging(),
                                   registry=CollectorRegistry(), process_metrics=False),
            "current": Forwarder(config(from_dict, logdir, "current"), transport=Acknowledging(),
                                 registry=CollectorRegistry(), process_metrics=False),
        }
        for fwd in sides.values():
            await fwd.start()
        script = wrk.write_script(logdir / f"post-{events}.lua", workload.body(workload.events(0, events)))
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        try:
            for _, name in stats.alternate(list(sides), rounds + 1):
                url = f"http://127.0.0.1:{sides[name].intake.port}{PATH}"
                cpu0 = time.process_time()
                run = await wrk.run(url, script, 32, window, DRIVER_CORE)
                run["cpu_us_per_request"] = (time.process_time() - cpu0) / max(1, run["ok"]) * 1e6
                runs[name].append(run)
        finally:
            for fwd in sides.values():
                await fwd.shutdown()
    out: dict = {"events_per_request": events, "rounds": rounds, "window": window}
    for name, measured in runs.items():
        measured = measured[1:]  # the first window of each side warms it up
        out[name] = {"rps": round(stats.median([r["rps"] for r in measured])),
                     "cpu_us_per_request": round(stats.median([r["cpu_us_per_request"] for r in measured]), 2),
                     "errors": sum(r["errors"] for r in measured)}
    out["ratio_rps"] = round(stats.ratio(out["current"]["rps"], out["baseline"]["rps"]), 3)
    out["ratio_cpu"] = round(stats.ratio(out["baseline"]["cpu_us_per_request"],
                                         out["current"]["cpu_us_per_request"]), 3)  # above 1: current cheaper
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="source tree to compare against")
    parser.add_argument("--events", type=int, default=1, help="events per POST")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--window", type=float, default=1.0, help="seconds per window (wrk rounds to whole seconds)")
    parser.add_argument("--logdir", type=Path, default=Path(__file__).resolve().parent / "out" / "intake_ab")
    args = parser.parse_args()
    if wrk.available() is None:
        parser.error("needs wrk (apt-get install wrk)")
    pin_self(SERVER_CORE)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(orjson.dumps(asyncio.run(compare(args.baseline.resolve(), args.events, args.rounds, args.window,
                                           args.logdir))).decode())


if __name__ == "__main__":
    main()
