"""Helpers of the mTLS and renewal end-to-end tests: what arrived at the emulator, which certificate a listener
serves, and SigV4-signed calls with boto3."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import orjson

from forwarder.emulator.harness import EmulatorProcess, wait_for

REGION = "eu-west-1"
EVENT = {"data": json.dumps({"k": 1}), "timestamp": 1_790_000_000, "type": "aws.evidently.custom"}


async def delivered_ids(emulator: EmulatorProcess, session: Any) -> Counter:
    """(project, data.i) of every event at the emulator, with how many times it arrived."""
    return Counter((e["project"], orjson.loads(e["data"])["i"]) for e in await emulator.events(session))


async def wait_delivered(emulator: EmulatorProcess, session: Any, acked: set, timeout: float = 60.0) -> Counter:
    async def all_there() -> bool:
        return acked <= set(await delivered_ids(emulator, session))
    await wait_for(all_there, timeout, f"{len(acked)} acknowledged events at the emulator", interval=0.2)
    return await delivered_ids(emulator, session)


def served_certificate(port: int) -> bytes:
    """DER of the certificate a new TLS connection to ``port`` is given."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)  # type: ignore[return-value]


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def credentials(*pairs: tuple[str, str]) -> str:
    """An AWS shared-credentials file with one profile per (key, secret)."""
    return "".join(f"[p{i}]\naws_access_key_id = {k}\naws_secret_access_key = {s}\n" for i, (k, s) in enumerate(pairs))


def boto(url: str, key: str, secret: str) -> Any:
    return boto3.client("evidently", region_name=REGION, endpoint_url=url, aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=botocore.config.Config(inject_host_prefix=False, retries={"total_max_attempts": 1}))


async def put(client: Any, project: str = "shop") -> dict:
    return await asyncio.to_thread(client.put_project_events, project=project, events=[EVENT])
