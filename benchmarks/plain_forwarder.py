"""``forwarder run`` with the event loop chosen on the command line.

``forwarder run`` always installs uvloop when it is importable; this runs the
same ``serve()`` on the stock asyncio loop too, so the suite can show what the
optional dependency buys. Usage: ``python -m benchmarks.plain_forwarder --loop asyncio CONFIG``.
"""

from __future__ import annotations

import argparse
import asyncio

from benchmarks.bare_server import loop_factory
from forwarder import config as config_mod
from forwarder.app import serve
from forwarder.observability import configure_logging


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), required=True)
    parser.add_argument("config")
    args = parser.parse_args()
    config = config_mod.load(args.config)
    configure_logging(config.log.level, config.log.format)
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        return runner.run(serve(config, args.config))


if __name__ == "__main__":
    raise SystemExit(main())
