"""The application's side: its wait per event, with and without the daemon; prints one JSON line.

``direct``: a boto3 ``put_project_events`` per event, straight to Evidently
(the emulator with an AWS-like round trip). ``post``: one HTTP POST per event to
the forwarder over a keep-alive ``http.client`` connection, what an app does
with the daemon. ``sdk_post``: the same boto3 call pointed at the forwarder's
Evidently-compatible intake (an app that keeps its SDK code). Alternated per
round in this one process, after a few warm-up calls each.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from urllib.parse import urlsplit

import boto3
import orjson
from botocore.config import Config

from benchmarks import workload

WARMUP = 5


def client(url: str):  # type: ignore[no-untyped-def]
    return boto3.session.Session().client(
        "evidently", region_name="us-east-1", endpoint_url=url, aws_access_key_id="bench",
        aws_secret_access_key="bench", config=Config(inject_host_prefix=False))


def sdk_calls(evidently, first: int, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    waits = []
    for e in workload.events(first, n):
        t = time.perf_counter()
        answer = evidently.put_project_events(project=workload.PROJECT, events=[workload.wire_event(e)])
        waits.append(time.perf_counter() - t)
        if answer["failedEventCount"]:
            raise RuntimeError(f"put_project_events: {answer}")
    return waits


def posts(conn: http.client.HTTPConnection, first: int, n: int) -> list[float]:
    waits = []
    path = f"/events/projects/{workload.PROJECT}"
    for e in workload.events(first, n):
        t = time.perf_counter()
        conn.request("POST", path, body=orjson.dumps({"events": [e]}), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        waits.append(time.perf_counter() - t)
        if response.status != 200:
            raise RuntimeError(f"POST to the forwarder: {response.status} {body[:200]!r}")
    return waits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--emulator", required=True)
    parser.add_argument("--forwarder", required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--direct-calls", type=int, required=True)
    parser.add_argument("--post-calls", type=int, required=True)
    args = parser.parse_args()
    direct, via = client(args.emulator), client(args.forwarder)
    fwd = urlsplit(args.forwarder)
    conn = http.client.HTTPConnection(fwd.hostname, fwd.port, timeout=30)
    sdk_calls(direct, 0, WARMUP)
    sdk_calls(via, 0, WARMUP)
    posts(conn, 0, WARMUP)
    waits: dict[str, list[float]] = {"direct": [], "post": [], "sdk_post": []}
    i = WARMUP
    for _ in range(args.rounds):
        waits["direct"] += sdk_calls(direct, i, args.direct_calls)
        waits["post"] += posts(conn, i, args.post_calls)
        waits["sdk_post"] += sdk_calls(via, i, args.post_calls)
        i += max(args.direct_calls, args.post_calls)
    conn.close()
    print(json.dumps(waits))


if __name__ == "__main__":
    main()
