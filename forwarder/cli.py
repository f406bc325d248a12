"""The ``forwarder`` command: run, check-config, emulator, dev, replay."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any, Callable, Sequence

from forwarder import __version__
from forwarder import config as config_mod
from forwarder.observability import configure_logging

DEV_EMULATOR_PORT = 8081


def _uvloop() -> None:
    # Used when installed (the bench extra), not a dependency: what it buys is in
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
        print(f"forwarder: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_run(args: argparse.Namespace) -> int:
    from forwarder.app import StartupError, serve
    from forwarder.delivery.client import ModelMissing

    config = _load(args.config)
    configure_logging(config.log.level, config.log.format)
    _uvloop()
    try:
        return asyncio.run(serve(config, args.config))
    except (ModelMissing, StartupError) as e:
        print(f"forwarder: cannot start: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"forwarder: cannot start: {e}", file=sys.stderr)
        return 2


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(config_mod.to_toml(config), end="")
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from forwarder.emulator.cli import credentials_from_args, faults_from_args, run_emulator

    run_emulator(args.host, args.port, faults_from_args(args), credentials_from_args(args), args.region)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """The daemon on its local defaults, delivering to an in-process emulator."""
    from forwarder.app import serve
    from forwarder.emulator.server import Emulator

    state = os.path.abspath(args.state_dir)
    raw = {
        "intake": {"port": args.port},
        "buffer": {"path": state},
        "evidently": {"endpoint_url": f"http://127.0.0.1:{args.emulator_port}", "default_project": "demo"},
        "dead_letter": {"path": os.path.join(state, "dead-letter.ndjson")},
        "log": {"format": "console"},
    }
    config = config_mod.from_dict(raw, os.environ)
    configure_logging(config.log.level, config.log.format)

    async def main() -> int:
        emulator = Emulator()
        await emulator.start("127.0.0.1", args.emulator_port)
        print(f"emulator: {emulator.url} (what it received: {emulator.url}/_emulator/events)", flush=True)
        print(f"forwarder: http://127.0.0.1:{args.port}  try:\n  curl -s -XPOST "
              f"http://127.0.0.1:{args.port}/events/projects/demo -H 'Content-Type: application/json' "
              "-d '{\"events\":[{\"data\":{\"hello\":\"world\"}}]}'", flush=True)
        try:
            return await serve(config, None, credentials=("local", "local"))
        finally:
            await emulator.close()

    return asyncio.run(main())


def cmd_replay(args: argparse.Namespace) -> int:
    from forwarder.replay import ReplayError, replay

    try:
        report = asyncio.run(replay(args.file, args.intake, args.project, args.timeout))
    except ReplayError as e:
        print(f"forwarder replay: {e}", file=sys.stderr)
        return 2
    print(f"accepted {report.accepted}, rejected {report.rejected}, unreadable lines {report.unreadable_lines}")
    for reason, count in report.reasons.most_common(10):
        print(f"  {count} x {reason}")
    return 0 if report.rejected == 0 and report.unreadable_lines == 0 else 1


class _Subcommand(argparse.ArgumentParser):
    """A subcommand whose flags may be added only when it is used (``flags``).

    So that ``forwarder run`` never imports the emulator for the emulator's flags.
    """

    def __init__(self, *args: Any, flags: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forwarder", description=__doc__)
    parser.add_argument("--version", action="version", version=f"forwarder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Subcommand)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", help="TOML file (defaults and FORWARDER_* variables without it)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate and print the effective configuration")
    check.add_argument("--config", help="TOML file")
    check.set_defaults(func=cmd_check_config)

    emulator = sub.add_parser("emulator", help="a local Evidently PutProjectEvents server", flags=_emulator_flags)
    emulator.set_defaults(func=cmd_emulator)

    dev = sub.add_parser("dev", help="the daemon on local defaults with an in-process emulator")
    dev.add_argument("--port", type=int, default=8080)
    dev.add_argument("--emulator-port", type=int, default=DEV_EMULATOR_PORT)
    dev.add_argument("--state-dir", default=".forwarder")
    dev.set_defaults(func=cmd_dev)

    rp = sub.add_parser("replay", help="send dead-lettered events back through a running forwarder")
    rp.add_argument("file")
    rp.add_argument("--intake", default="http://127.0.0.1:8080")
    rp.add_argument("--project", help="send every event to this project instead of its own")
    rp.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole replay, retries included")
    rp.set_defaults(func=cmd_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
