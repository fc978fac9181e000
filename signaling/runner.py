"""Running the application as a process: listen, and stop as an orchestrator expects.

- SIGTERM or SIGINT: stop accepting connections, end every session (each peer sees its
  connection close), let requests in flight finish, and exit 0, all within the grace period,
  however slow the clients are.
- The media side failed for good (`failed` is set): the same, but exit 1, so that Docker or
  systemd restarts the process.
- A client must send each request's headers within `request_timeout` of connecting or of the
  previous response (aiohttp's keep-alive timer, which a half-sent request does not reset).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time

from aiohttp import web

from signaling.config import ServerConfig

log = logging.getLogger(__name__)

# Of the grace period, what the process keeps for itself to exit once the server has stopped
# (asyncio's own shutdown, threads joining, the interpreter tearing down its modules).
EXIT_SECONDS = 0.5


def app_runner(app: web.Application, config: ServerConfig) -> web.AppRunner:
    """The app's runner with the server's connection settings (also used by the tests)."""
    return web.AppRunner(
        app,
        keepalive_timeout=config.request_timeout,
        shutdown_timeout=_stop_within(config.shutdown_grace),
        handle_signals=False,
    )


async def run(
    app: web.Application,
    config: ServerConfig,
    failed: asyncio.Event,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Serve `app` until a signal (exit code 0) or `failed` (exit code 1)."""
    runner = app_runner(app, config)
    await runner.setup()  # the app's start-up: avatars, the engine's warm-up
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
        await site.start()
        scheme = "https" if ssl_context else "http"
        log.info("serving on %s://%s:%d", scheme, config.host, config.port)
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(failed.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
    finally:
        code = 0 if stop.is_set() or not failed.is_set() else 1
        await _stop(runner, _stop_within(config.shutdown_grace))
    return code


def _stop_within(grace: float) -> float:
    return max(grace / 2, grace - EXIT_SECONDS)


async def _stop(runner: web.AppRunner, within: float) -> None:
    """Stop listening, end the sessions, finish or cancel requests: at most `within` seconds."""
    started = time.monotonic()
    log.info("stopping: ending sessions and requests within %g s", within)
    try:
        async with asyncio.timeout(within):
            await runner.cleanup()
    except TimeoutError:
        log.warning("not stopped after %g s; exiting anyway", within)
    log.info("stopped in %.1f s", time.monotonic() - started)
