"""One sender variant in its own process, timed; prints one JSON line.

``forwarder``: the real pipeline in-process (buffer -> flush loop -> sender ->
EvidentlyClient): N events appended to a running ``Forwarder``'s buffer at once,
then timed until the buffer's depth is back to 0 (every event acknowledged).
``raw``: the floor: aiohttp posting the same pre-encoded 50-event bodies, each
signed with botocore's ``SigV4Auth`` once per request like the SDK does.
``sdk``: what an application gets from stock aiobotocore ``put_project_events``
(parameter validation on, float timestamps, botocore serialising each event).
CPU time is this process's (``resource.getrusage``), taken from the moment the
events are ready to go.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time

import aiohttp
import orjson
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from benchmarks import workload
from benchmarks.bare_server import loop_factory
from forwarder import config as config_mod
from forwarder.app import Forwarder
from forwarder.delivery.client import encode_body
from forwarder.evidently.events import encode_event
from forwarder.observability import configure_logging

BATCH = 50
REGION = "us-east-1"
CREDENTIALS = ("bench", "bench")


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def encoded_batches(n: int) -> list[list[bytes]]:
    now = time.time()
    evs = [encode_event(e, i, now) for i, e in enumerate(workload.events(0, n))]
    return [evs[i:i + BATCH] for i in range(0, n, BATCH)]


async def forwarder(url: str, n: int, concurrency: int) -> tuple[float, float]:
    state = tempfile.mkdtemp(prefix="bench-sender-")
    config = config_mod.from_dict({
        "intake": {"port": 0},
        "buffer": {"max_events": max(n, 1000), "max_bytes": 2**31},
        "evidently": {"endpoint_url": url, "concurrency": concurrency, "max_rate": 100_000.0,
                      "initial_rate": 100_000.0},
        "dead_letter": {"path": f"{state}/dead-letter.ndjson"},
    }, {})
    fwd = Forwarder(config, None, credentials=CREDENTIALS, process_metrics=False)
    await fwd.start()
    try:
        batches = encoded_batches(n)
        received = time.time()
        # No await yields in between: the flush loop sees all N at once, a pre-filled buffer.
        for batch in batches:
            await fwd.buffer.append(workload.PROJECT, batch, received)
        t0, c0 = time.perf_counter(), cpu()
        while fwd.buffer.depth:
            await asyncio.sleep(0.002)
        return time.perf_counter() - t0, cpu() - c0
    finally:
        await fwd.shutdown()


async def raw(url: str, n: int, concurrency: int) -> tuple[float, float]:
    batches = encoded_batches(n)
    signer = SigV4Auth(Credentials(*CREDENTIALS), "evidently", REGION)
    endpoint = f"{url}/events/projects/{workload.PROJECT}"
    todo = iter(batches)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            for batch in todo:
                body = encode_body(batch)
                request = AWSRequest("POST", endpoint, data=body, headers={"Content-Type": "application/json"})
                signer.add_auth(request)
                async with session.post(endpoint, data=body, headers=dict(request.headers.items())) as r:
                    answer = orjson.loads(await r.read())
                if r.status != 200 or answer["failedEventCount"]:
                    raise RuntimeError(f"raw sender: {r.status} {answer}")

        t0, c0 = time.perf_counter(), cpu()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, cpu() - c0


async def sdk(url: str, n: int, concurrency: int) -> tuple[float, float]:
    evs = [workload.wire_event(e) for e in workload.events(0, n)]
    batches = [evs[i:i + BATCH] for i in range(0, n, BATCH)]
    todo = iter(batches)
    session = AioSession()
    async with session.create_client(
        "evidently", region_name=REGION, endpoint_url=url,
        aws_access_key_id=CREDENTIALS[0], aws_secret_access_key=CREDENTIALS[1],
        # The one setting a local endpoint needs: without it botocore calls dataplane.127.0.0.1.
        config=AioConfig(inject_host_prefix=False, max_pool_connections=concurrency),
    ) as client:
        async def worker() -> None:
            for batch in todo:
                answer = await client.put_project_events(project=workload.PROJECT, events=batch)
                if answer["failedEventCount"]:
                    raise RuntimeError(f"sdk sender: {answer}")

        t0, c0 = time.perf_counter(), cpu()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, cpu() - c0


MODES = {"forwarder": forwarder, "raw": raw, "sdk": sdk}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=list(MODES))
    parser.add_argument("--url", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    configure_logging("warning", "json", stream=sys.stderr)
    n = args.events - args.events % BATCH
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        seconds, cpu_seconds = runner.run(MODES[args.mode](args.url, n, args.concurrency))
    print(json.dumps({"mode": args.mode, "loop": args.loop, "events": n, "seconds": seconds,
                      "cpu_seconds": cpu_seconds, "events_per_s": n / seconds,
                      "calls_per_s": n / BATCH / seconds, "cpu_us_per_event": cpu_seconds / n * 1e6}))


if __name__ == "__main__":
    main()
