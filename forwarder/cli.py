"""The forwarder command: run, check-config, status, healthcheck, replay, dev, emulator."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from importlib import metadata
from typing import Any, Callable, Sequence

from forwarder import __version__
from forwarder import config as config_mod
from forwarder.observability import configure_logging

DEV_PORT = 8080
DEV_EMULATOR_PORT = 8081
MODEL_PACKAGE = "botocore-a-la-carte-evidently"


class CommandError(Exception):
    """An expected failure (a busy port, a missing file): one line on stderr, exit 2, no traceback."""


def _uvloop() -> None:
    # Used when installed (the speed extra), not a dependency: what it buys is in
    # benchmarks/RESULTS.md, rows "uvloop vs asyncio".
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _load(path: str | None) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as e:
        raise CommandError(f"configuration error: {e}") from None


def _cannot(what: str, e: OSError) -> CommandError:
    """``cannot start: [Errno 98] ... address already in use`` as one line."""
    return CommandError(f"{what}: {e.filename + ': ' if e.filename else ''}{e.strerror or e}")


def version_text() -> str:
    try:
        model = metadata.version(MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        model = "not installed"
    return f"forwarder {__version__} ({MODEL_PACKAGE} {model}, Python {sys.version.split()[0]})"


# --- commands ----------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from forwarder.app import StartupError, serve
    from forwarder.delivery.client import ModelMissing

    config = _load(args.config)
    configure_logging(config.log.level, config.log.format)
    _uvloop()
    try:
        return asyncio.run(serve(config, args.config))
    except (ModelMissing, StartupError) as e:
        raise CommandError(f"cannot start: {e}") from None
    except OSError as e:
        raise _cannot("cannot start", e) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    from forwarder.preflight import problems

    config = _load(args.config)
    ev = config.evidently
    print(f"# evidently.region = {ev.region!r} from {ev.region_source}")
    print(config_mod.to_toml(config), end="", flush=True)
    found = problems(config)  # every file the configuration names, opened as the daemon will
    for problem in found:
        print(f"forwarder: configuration error: {problem}", file=sys.stderr)
    return 2 if found else 0


def cmd_status(args: argparse.Namespace) -> int:
    from forwarder.status_view import StatusError, fetch, render, status_url

    url = args.url or status_url(_load(args.config) if args.config else None)
    try:
        while True:
            try:
                doc = fetch(url, args.timeout)
            except StatusError as e:
                print(f"forwarder status: {e}", file=sys.stderr)
                if not args.watch:
                    return 2
                doc = None
            if args.watch and not args.json:
                print("\x1b[H\x1b[2J", end="")  # clear the terminal, like top
            if args.json:
                print(json.dumps(doc, indent=2), flush=True)
            else:
                print(render(doc, url) if doc is not None else f"(no answer from {url})", flush=True)
            if not args.watch:
                return 0 if doc.get("state") == "ok" else 1  # scripts can tell "stuck" from "fine"
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from forwarder.healthcheck import probe

    problem = asyncio.run(probe(_load(args.config), args.timeout))
    if problem is not None:
        print(f"forwarder healthcheck: unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from forwarder.emulator.cli import credentials_from_args, faults_from_args, run_emulator

    try:
        run_emulator(args.host, args.port, faults_from_args(args), credentials_from_args(args), args.region)
    except ValueError as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        raise _cannot("cannot start", e) from None
    return 0


def default_state_dir() -> str:
    """Where ``forwarder dev`` keeps its buffer and dead letters: $XDG_STATE_HOME/forwarder/dev."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    if not os.path.isabs(base):  # the XDG spec: a relative value is to be ignored
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "forwarder", "dev")


def cmd_dev(args: argparse.Namespace) -> int:
    """The daemon on its local defaults, delivering to an in-process emulator."""
    from forwarder.app import StartupError, serve
    from forwarder.emulator.server import Emulator

    state = args.state_dir or (tempfile.mkdtemp(prefix="forwarder-dev-") if args.temporary else default_state_dir())
    state = os.path.abspath(state)
    raw = {
        "intake": {"port": args.port},
        "buffer": {"path": state},
        "evidently": {"endpoint_url": f"http://127.0.0.1:{args.emulator_port}", "default_project": "demo"},
        "dead_letter": {"path": os.path.join(state, "dead-letter.ndjson")},
        "log": {"format": "console"},
    }
    try:
        config = config_mod.from_dict(raw, os.environ)
    except config_mod.ConfigError as e:
        raise CommandError(f"configuration error: {e}") from None
    configure_logging(config.log.level, config.log.format)

    async def main() -> int:
        emulator = Emulator()
        await emulator.start("127.0.0.1", args.emulator_port)
        print(f"emulator: {emulator.url} (what it received: {emulator.url}/_emulator/events)", flush=True)
        print(f"forwarder: http://127.0.0.1:{args.port} (state in {state})  try:\n  curl -s -XPOST "
              f"http://127.0.0.1:{args.port}/events/projects/demo -H 'Content-Type: application/json' "
              "-d '{\"events\":[{\"data\":{\"hello\":\"world\"}}]}'", flush=True)
        try:
            return await serve(config, None, credentials=("local", "local"))
        finally:
            await emulator.close()

    try:
        return asyncio.run(main())
    except StartupError as e:
        raise CommandError(f"cannot start: {e}") from None
    except OSError as e:
        raise _cannot("cannot start", e) from None
    finally:
        if args.temporary and not args.state_dir:
            shutil.rmtree(state, ignore_errors=True)


def cmd_replay(args: argparse.Namespace) -> int:
    from forwarder.replay.run import Limits, ReplayError, replay
    from forwarder.replay.target import TargetError, make_target

    settings = _replay_settings(args)
    try:
        target = make_target(settings["intake"], settings["auth"], token_file=settings["token_file"],
                             region=settings["region"], ca_bundle=args.ca_bundle)
    except TargetError as e:
        raise CommandError(str(e)) from None
    limits = Limits(settings["max_body_bytes"], settings["max_events"])

    async def main() -> Any:
        stop = asyncio.Event()
        task = asyncio.current_task()
        assert task is not None

        def interrupted() -> None:
            if stop.is_set():
                task.cancel()  # a second Ctrl-C: at once (the request in flight is sent again next time)
                return
            stop.set()
            print("\nforwarder replay: stopping after the request in flight (again to stop at once)",
                  file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupted)
        return await replay(settings["file"], target, project=args.project, timeout=args.timeout, limits=limits,
                            dry_run=args.dry_run, from_start=args.from_start, stop=stop, progress=sys.stderr)

    try:
        report = asyncio.run(main())
    except ReplayError as e:
        raise CommandError(str(e)) from None
    except asyncio.CancelledError:
        print("forwarder replay: stopped; run the same command again to resume", file=sys.stderr)
        return 130
    return _print_replay_report(report, args.dry_run)


def _replay_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The replay's options, each from its flag, else from the forwarder's --config, else the default."""
    from forwarder.healthcheck import intake_listener

    config = _load(args.config) if args.config else None
    listener = intake_listener(config) if config else None
    settings = {
        "file": args.file or (config.dead_letter.path if config else None),
        "intake": args.intake or (listener.intake if listener else "http://127.0.0.1:8080"),
        "auth": args.auth or (config.intake.auth if config else "none"),
        "token_file": args.token_file or (config.intake.token_file if config else None) or None,
        "region": args.region or (config.evidently.region if config else None),
        "max_body_bytes": args.max_body_bytes or (config.intake.max_body_bytes if config else 1_048_576),
        "max_events": args.max_events or (config.intake.max_events_per_request if config else 500),
    }
    if not settings["file"]:
        raise CommandError("name the dead-letter FILE, or --config FILE to use its dead_letter.path")
    return settings


def _print_replay_report(report: Any, dry_run: bool) -> int:
    files = ", ".join(report.files)
    if dry_run:
        would = sum(report.per_project.values())
        print(f"would send {would} events from {files}; unreadable lines {report.unreadable_lines}")
        for title, counts in (("per project", report.per_project), ("per error code", report.per_code)):
            print(f"  {title}:")
            for name, count in counts.most_common():
                print(f"    {count:>8}  {name}")
        return 0
    if report.total == 0:
        print(f"nothing to replay in {files}: every line was replayed before (offsets in {report.files[-1]}"
              ".replayed; --from-start sends everything again)")
        return 0
    print(f"replayed {report.accepted + report.rejected} of {report.total} events from {files} in "
          f"{report.seconds:.1f} s: accepted {report.accepted}, rejected {report.rejected}, "
          f"unreadable lines {report.unreadable_lines}")
    for reason, count in report.reasons.most_common(10):
        print(f"  {count} x {reason}")
    if report.stopped:
        print(f"{report.stopped}: run the same command again to resume")
        return 1
    return 0 if report.rejected == 0 and report.unreadable_lines == 0 else 1


# --- the parser --------------------------------------------------------------


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, "", []) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class _Subcommand(argparse.ArgumentParser):
    """A subcommand whose flags may be added only when it is used (``flags``).

    So that ``forwarder run`` never imports the emulator for the emulator's flags.
    """

    def __init__(self, *args: Any, flags: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)
        self._flags = flags

    def _add_flags(self) -> None:
        flags, self._flags = self._flags, None
        if flags is not None:
            flags(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._add_flags()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_flags()
        return super().format_help()


def _emulator_flags(parser: argparse.ArgumentParser) -> None:
    from forwarder.emulator.cli import add_cli_arguments
    add_cli_arguments(parser)


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value
    return parse


def _add_replay(sub: Any) -> None:
    from forwarder.replay.target import AUTH_CHOICES, TOKEN_ENV

    rp = sub.add_parser("replay", help="send dead-lettered events back through a running forwarder",
                        description="Send the events of a dead-letter file and its rotations (FILE.5 ... FILE.1, "
                                    "FILE) back through a forwarder's intake. Progress is kept in FILE.replayed: "
                                    "a second run sends nothing already answered, an interrupted run resumes.")
    rp.add_argument("file", nargs="?", metavar="FILE",
                    help="the dead-letter file (dead_letter.path); default: the one of --config")
    rp.add_argument("--config", help="the forwarder's TOML file: the intake address, auth, limits, region and "
                                     "dead-letter file come from it unless given here")
    rp.add_argument("--intake", help="http://HOST:PORT, https://HOST:PORT or unix:///PATH "
                                     "(default: from --config, else http://127.0.0.1:8080)")
    rp.add_argument("--auth", choices=AUTH_CHOICES,
                    help="what the intake's intake.auth asks for: token (--token-file or "
                         f"{TOKEN_ENV}), sigv4 (the standard AWS credential chain and --region) "
                         "(default: from --config, else none)")
    rp.add_argument("--token-file", help=f"a file whose first token is sent as the bearer token (else {TOKEN_ENV})")
    rp.add_argument("--region", help="the region to sign for with --auth sigv4 (the forwarder's evidently.region; "
                                     "default: from --config, else AWS_REGION / the profile's region)")
    rp.add_argument("--ca-bundle", help="CA certificates to verify an https intake with (default: AWS_CA_BUNDLE, "
                                        "else the system's)")
    rp.add_argument("--project", help="send every event to this project instead of its own")
    rp.add_argument("--max-body-bytes", type=_positive(int),
                    help="request body limit, the intake's intake.max_body_bytes (default: from --config, "
                         "else 1048576)")
    rp.add_argument("--max-events", type=_positive(int),
                    help="events per request, the intake's intake.max_events_per_request (default: from "
                         "--config, else 500)")
    rp.add_argument("--timeout", type=_positive(float), default=300.0,
                    help="seconds for the whole replay, retries included")
    rp.add_argument("--dry-run", action="store_true",
                    help="send nothing: count what would be sent, per project and per error code")
    rp.add_argument("--from-start", action="store_true",
                    help="ignore FILE.replayed and send every line again")
    rp.set_defaults(func=cmd_replay)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forwarder", description=__doc__)
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Subcommand)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", help="TOML file (without it: the defaults and FORWARDER_* variables)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate and print the effective configuration")
    check.add_argument("--config", help="TOML file (without it: the defaults and FORWARDER_* variables)")
    check.set_defaults(func=cmd_check_config)

    st = sub.add_parser("status", help="what a running forwarder does and why it is stuck (GET /status)")
    st.add_argument("--url", help="the forwarder's intake or metrics listener, e.g. http://127.0.0.1:8080 "
                                  "(without it: from --config, else http://127.0.0.1:8080)")
    st.add_argument("--config", help="TOML file of the forwarder to ask (its metrics or intake listener)")
    st.add_argument("--watch", type=float, nargs="?", const=2.0, default=0.0, metavar="SECONDS",
                    help="refresh every SECONDS (2 when given without a value) until interrupted, like top")
    st.add_argument("--json", action="store_true", help="print the document as JSON")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    st.set_defaults(func=cmd_status)

    health = sub.add_parser("healthcheck", help="exit 0 when the daemon of this configuration answers",
                            description="GET /healthz on the listener the configuration has: the TCP intake "
                                        "(HTTPS with intake.tls_cert_file), else intake.unix_socket. Exit 0 when "
                                        "it answers 200, else 1.")
    health.add_argument("--config", help="TOML file (without it: the defaults and FORWARDER_* variables)")
    health.add_argument("--timeout", type=_positive(float), default=3.0, help="seconds for the probe")
    health.set_defaults(func=cmd_healthcheck)

    _add_replay(sub)

    dev = sub.add_parser("dev", help="the daemon on local defaults with an in-process emulator")
    dev.add_argument("--port", type=int, default=DEV_PORT, help="the intake's port on 127.0.0.1")
    dev.add_argument("--emulator-port", type=int, default=DEV_EMULATOR_PORT, help="the emulator's port on 127.0.0.1")
    dev.add_argument("--state-dir", help="buffer and dead-letter directory "
                                         "(default: $XDG_STATE_HOME/forwarder/dev, else ~/.local/state/forwarder/dev)")
    dev.add_argument("--temporary", action="store_true",
                     help="keep state in a new temporary directory instead, removed on exit")
    dev.set_defaults(func=cmd_dev)

    emulator = sub.add_parser("emulator", help="a local Evidently PutProjectEvents server", flags=_emulator_flags)
    emulator.set_defaults(func=cmd_emulator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as e:
        # The daemon's own commands say "forwarder:" (what logs and alerts already match); the tools name themselves.
        prefix = "forwarder" if args.command in ("run", "check-config") else f"forwarder {args.command}"
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
