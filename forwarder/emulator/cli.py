"""``forwarder emulator``: its flags and its serving loop."""

from __future__ import annotations

import argparse
import asyncio
import signal

from forwarder.emulator.faults import FaultConfig, normalize_fault_fields
from forwarder.emulator.server import DEFAULT_REGION, Emulator


def run_emulator(host: str, port: int, faults: FaultConfig, credentials: dict[str, str] | None = None,
                 region: str = DEFAULT_REGION) -> None:
    """Serve until SIGTERM or SIGINT; blocks. Prints the URL once listening."""
    try:
        import uvloop  # optional (the speed extra); the emulator must outpace what it measures

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(host, port, Emulator(faults, credentials=credentials, region=region)))


async def _serve(host: str, port: int, emulator: Emulator) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await emulator.start(host, port)
        # A parent process waits for this line before sending traffic.
        print(f"emulator listening on {emulator.url}", flush=True)
        await stop.wait()
    finally:
        await emulator.close()


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's flags: where to listen and one flag per fault."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on; 0 picks a free one")
    parser.add_argument("--quota", type=_non_negative, default=0.0, help="account requests/s; 0 = unlimited")
    parser.add_argument("--quota-burst", type=_non_negative, default=None, help="token bucket size; default one second's worth")
    parser.add_argument("--throttle-event-rate", type=_rate, default=0.0, help="random fraction of events failed as ThrottlingException")
    parser.add_argument("--invalid-event-rate", type=_rate, default=0.0, help="stable fraction of events failed as ValidationException")
    parser.add_argument("--reject-marker", default="", help="fail a whole request with 400 when an event's data contains this")
    parser.add_argument("--error-rate", type=_rate, default=0.0, help="fraction of requests answered 500")
    parser.add_argument("--latency", type=_non_negative, default=0.0, help="seconds added before each answer")
    parser.add_argument("--down", action="store_true", help="answer PutProjectEvents with 503")
    parser.add_argument("--missing-project", action="append", default=[], dest="missing_projects", help="answer 404 for this project (repeatable)")
    parser.add_argument("--denied-project", action="append", default=[], dest="denied_projects", help="answer 403 for this project (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="seed for random faults")
    parser.add_argument("--no-record", action="store_false", dest="record", help="keep counters only, not events")
    parser.add_argument("--credentials", action="append", default=[], type=_credential, metavar="KEY:SECRET",
                        help="verify every SigV4 signature against these credentials (repeatable); "
                             "without, only the form of the Authorization header is checked")
    parser.add_argument("--region", default=DEFAULT_REGION,
                        help="the region signatures must be scoped to, with --credentials")


def _credential(text: str) -> tuple[str, str]:
    key, sep, secret = text.partition(":")
    if not (sep and key and secret):
        raise argparse.ArgumentTypeError(f"must be ACCESS_KEY_ID:SECRET, got {text!r}")
    return key, secret


def credentials_from_args(args: argparse.Namespace) -> dict[str, str] | None:
    """Access key id -> secret from ``--credentials``; None (format checks only) without any."""
    return dict(args.credentials) or None


def faults_from_args(args: argparse.Namespace) -> FaultConfig:
    """The FaultConfig for parsed ``add_cli_arguments`` flags; ValueError names a bad one."""
    fields = {
        "quota": args.quota,
        "quota_burst": args.quota_burst,
        "throttle_event_rate": args.throttle_event_rate,
        "invalid_event_rate": args.invalid_event_rate,
        "reject_marker": args.reject_marker,
        "error_rate": args.error_rate,
        "latency": args.latency,
        "down": args.down,
        "missing_projects": tuple(args.missing_projects or ()),
        "denied_projects": tuple(args.denied_projects or ()),
        "seed": args.seed,
        "record": args.record,
    }
    return FaultConfig(**normalize_fault_fields(fields))
