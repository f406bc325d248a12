"""Helpers shared by test modules: events, configurations, observers, signed requests, raw HTTP answers.

Test modules import from here (and tests/fakes.py, tests/tools.py, tests/upstream.py), never from each other.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import boto3
import botocore.config
import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from multidict import CIMultiDict

from forwarder.buffer.contract import Chunk, Receipt
from forwarder.config import Config, from_dict
from forwarder.observability import Metrics, Observer

JSON = {"Content-Type": "application/json"}


# --- events ---------------------------------------------------------------------------------------

def events(n: int, tag: str = "e") -> list[bytes]:
    """``n`` events in their final PutProjectEvents encoding, as the buffer holds them; data ``{"id": "<tag><i>"}``."""
    return [orjson.dumps({"data": orjson.dumps({"id": f"{tag}{i}"}).decode(), "timestamp": 1_790_000_000.5,
                          "type": "aws.evidently.custom"}) for i in range(n)]


def event_dicts(n: int, start: int = 0, **data: Any) -> list[dict]:
    """``n`` events as a client posts them: data ``{"i": i, **data}``, i from ``start``."""
    return [{"data": json.dumps({"i": i, **data}), "timestamp": 1_700_000_000 + i,
             "type": "aws.evidently.custom"} for i in range(start, start + n)]


def numbered(start: int, n: int) -> list[dict]:
    """Events as the shortest client sends them (data an object, no timestamp or type), ``i`` from ``start``."""
    return [{"data": {"i": i}} for i in range(start, start + n)]


def receipt(chunk: Chunk, start: int = 0, stop: int | None = None) -> Receipt:
    """The receipt of ``chunk``'s events ``start:stop``, as a batch holding them would carry it."""
    stop = len(chunk.events) if stop is None else stop
    return Receipt([(chunk.lease, chunk.first + start, chunk.first + stop)])


# --- configuration and observers ------------------------------------------------------------------

def make_config(tmp_path: Path, emulator_url: str, **sections: dict) -> Config:
    """An in-process forwarder's configuration: a free port, small limits, short timers."""
    raw: dict[str, dict] = {
        "intake": {"port": 0, "max_body_bytes": 4096, "max_events_per_request": 20},
        "batch": {"flush_interval": 0.05},
        "evidently": {"endpoint_url": emulator_url, "default_project": "dflt"},
        "retry": {"initial_backoff": 0.01, "max_backoff": 0.05},
        "dead_letter": {"path": str(tmp_path / "dl.ndjson")},
        "shutdown": {"drain_timeout": 2.0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw, {})


def process_sections(endpoint: str, **extra: dict) -> dict:
    """A ``forwarder run`` process's configuration sections: small batches, short backoffs."""
    config: dict[str, dict] = {
        "evidently": {"endpoint_url": endpoint, "concurrency": 2},
        "batch": {"max_events": 10, "flush_interval": 0.05},
        "retry": {"initial_backoff": 0.01, "max_backoff": 0.1, "max_elapsed": 60.0},
        "shutdown": {"drain_timeout": 5.0},
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    return config


def observer(log: Any = None) -> Observer:
    """An observer with its own metrics registry (no process collectors), logging to ``log`` if given."""
    return Observer(Metrics(process_collectors=False), log)


# --- clients and answers --------------------------------------------------------------------------

def boto_client(url: str, key: str = "k", secret: str = "s", region: str = "us-east-1") -> Any:
    """A boto3 Evidently client for the intake at ``url``: no host prefix, no retries."""
    return boto3.client("evidently", region_name=region, endpoint_url=url, aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=botocore.config.Config(inject_host_prefix=False, retries={"total_max_attempts": 1}))


def head_and_body(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of a raw HTTP/1.1 answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def sign(url: str, body: bytes, key: str, secret: str, region: str, service: str = "evidently",
         at: datetime.datetime | None = None, headers: dict[str, str] | None = None) -> tuple[str, CIMultiDict[str]]:
    """A POST of ``body`` to ``url`` signed by botocore's SigV4 signer (at ``at``, default now): the request
    target and the headers as a server receives them, Host included."""
    request = AWSRequest("POST", url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    signer = SigV4Auth(Credentials(key, secret), service, region)
    if at is None:
        signer.add_auth(request)
    else:
        with mock.patch("botocore.auth.get_current_datetime", return_value=at):
            signer.add_auth(request)
    prepared = request.prepare()
    received: CIMultiDict[str] = CIMultiDict()
    for name, value in prepared.headers.items():
        received.add(name, value.decode() if isinstance(value, bytes) else value)
    received["Host"] = urlsplit(url).netloc
    parts = urlsplit(prepared.url)
    return parts.path + (f"?{parts.query}" if parts.query else ""), received


# --- forwarder processes --------------------------------------------------------------------------

async def post_numbered(session: Any, fwd: Any, start: int, n: int, project: str = "p") -> None:
    """Post ``numbered(start, n)`` to a ``ForwarderProcess`` and require all of them accepted."""
    status, body = await fwd.post(session, project, numbered(start, n))
    assert status == 200 and body["failedEventCount"] == 0, body


async def queue_empty(session: Any, fwd: Any) -> bool:
    """Whether a ``ForwarderProcess`` reports nothing left to deliver."""
    return await fwd.metric(session, "forwarder_queue_depth") == 0
