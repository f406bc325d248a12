"""The intake alone, this checkout against another source tree of the forwarder, in one run.

    git archive <commit> | tar -x -C /tmp/base
    python -m benchmarks.intake_ab --baseline /tmp/base [--events 1] [--rounds 5] [--duration 4]

Both forwarders run side by side on the server core with Evidently down (the
emulator answers 503), so each only validates, encodes and buffers; the load
alternates between them (A, B, A, B, ...), as in intake_bench. Prints one JSON
line: requests/s and server CPU per request per side (medians) and their ratios
(this checkout / baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import orjson

from benchmarks import stats, workload, wrk
from benchmarks.context import Context
from benchmarks.intake_bench import Subject, alternate
from benchmarks.procs import (DRIVER_CORE, ROOT, SERVER_CORE, Child, Emulator, Forwarder, child_env,
                              forwarder_sections, pin_self, pinned_to)

BUFFER = {"max_events": 20_000_000, "max_bytes": 16 * 2**30}


class SourceChild(Child):
    """A child run from another source tree (its directory first on PYTHONPATH)."""

    def __init__(self, name: str, args: list[str], logdir: Path, core: int | None, source: Path) -> None:
        super().__init__(name, args, logdir, core)
        self.source = source

    def start(self) -> "SourceChild":
        env = child_env()
        env["PYTHONPATH"] = os.pathsep.join([str(self.source), str(ROOT)])
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=self.source,
                                      preexec_fn=pinned_to(self.core))
        return self


async def side(ctx: Context, stack: ExitStack, emulator: Emulator, name: str, source: Path | None) -> Subject:
    fwd = Forwarder(ctx.logdir, forwarder_sections(ctx.logdir, name, emulator.url, buffer=BUFFER), name=name)
    if source is not None:
        fwd.child = SourceChild(name, fwd.child.args, ctx.logdir, SERVER_CORE, source)
    stack.callback(fwd.stop)
    await fwd.start(ctx.session)
    return Subject(name, fwd.url, None, fwd.child.counters)


async def compare(baseline: Path, events: int, rounds: int, duration: float, logdir: Path) -> dict:
    logdir.mkdir(parents=True, exist_ok=True)
    body = workload.body(workload.events(0, events))
    async with aiohttp.ClientSession() as session:
        ctx = Context(session, logdir, quick=False, use_wrk=wrk.available() is not None)
        with ExitStack() as stack:
            emulator = Emulator(logdir, "--no-record", "--down", name="emulator-ab")
            stack.callback(emulator.stop)
            await emulator.start(session)
            base = await side(ctx, stack, emulator, "baseline", baseline)
            new = await side(ctx, stack, emulator, "current", None)
            await alternate(ctx, [base, new], body, rounds, duration)
    out: dict = {"events_per_request": events, "rounds": rounds, "duration": duration,
                 "load_generator": "wrk" if ctx.use_wrk else "aiohttp"}
    for s in (base, new):
        out[s.name] = {"rps": [round(r["rps"]) for r in s.runs],
                       "cpu_us_per_request": [round(r["cpu_us_per_request"], 1) for r in s.runs],
                       "errors": sum(r["errors"] for r in s.runs)}
    rps = [stats.median(out[n]["rps"]) for n in ("current", "baseline")]
    cpu = [stats.median(out[n]["cpu_us_per_request"]) for n in ("baseline", "current")]
    out["ratio_rps"] = round(stats.ratio(*rps), 3)  # current / baseline
    out["ratio_cpu"] = round(stats.ratio(*cpu), 3)  # baseline CPU / current CPU: above 1 = current cheaper
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="source tree to compare against")
    parser.add_argument("--events", type=int, default=1, help="events per POST")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per window")
    parser.add_argument("--logdir", type=Path, default=ROOT / "benchmarks" / "out" / "intake_ab")
    args = parser.parse_args()
    pin_self(DRIVER_CORE)
    result = asyncio.run(compare(args.baseline.resolve(), args.events, args.rounds, args.duration, args.logdir))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
