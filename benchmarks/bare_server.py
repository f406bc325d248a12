"""The yardstick for the intake: a bare aiohttp handler that reads the body and answers 200.

Run as ``python -m benchmarks.bare_server --port N``. It uses uvloop when
importable, exactly as ``forwarder run`` does, so both sides share the loop.
``--server app`` (the yardstick) is a ``web.Application`` route; ``--server
lowlevel`` is the same handler on aiohttp's low-level ``web.Server``, which the
forwarder's intake is built on: the stricter comparison, reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

ANSWER = b'{"failedEventCount":0}'


async def put_events(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def build_app() -> web.Application:
    app = web.Application(client_max_size=1_048_576)  # the forwarder's default intake.max_body_bytes
    app.router.add_post("/events/projects/{project}", put_events)
    app.router.add_get("/healthz", healthz)
    return app


async def any_path(request: web.BaseRequest) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


def loop_factory(name: str):
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return None
        return uvloop.new_event_loop
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--server", choices=("app", "lowlevel"), default="app")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(_serve(args.port, args.server))


async def _serve(port: int, server: str) -> None:
    runner: web.BaseRunner
    if server == "lowlevel":
        runner = web.ServerRunner(web.Server(any_path), access_log=None, handle_signals=False)
    else:
        runner = web.AppRunner(build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until killed: SIGTERM keeps its default action


if __name__ == "__main__":
    main()
