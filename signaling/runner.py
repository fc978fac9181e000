"""Running the application as a process: listen, and stop as an orchestrator expects.

- SIGTERM or SIGINT: stop accepting connections, end every session (each peer sees its
  connection close), let requests in flight finish, and exit 0, all within the grace period,
  however slow the clients are. A media worker first drains (`before_stop`): it takes no new
  session and lets the live ones end by themselves for most of the grace period.
- The media side failed for good (`failed` is set): the same, but exit 1, so that Docker or
  systemd restarts the process.
- A client must send each request's headers within `request_timeout` of connecting or of the
  previous response (aiohttp's keep-alive timer, which a half-sent request does not reset).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from signaling.config import ServerConfig

log = logging.getLogger(__name__)

# Of the grace period, what the process keeps for itself to exit once the server has stopped
# (asyncio's own shutdown, threads joining, the interpreter tearing down its modules).
EXIT_SECONDS = 0.5
# Of the grace period, what is kept after draining for closing the sessions left and requests.
CLOSE_SECONDS = 1.0


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
    before_stop: Callable[[float], Awaitable[None]] | None = None,
    listening: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Serve `app` until a signal (exit code 0) or `failed` (exit code 1). `listening` is
    awaited once connections are accepted; on a signal, `before_stop` gets the seconds it may
    take before the server stops."""
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
        if listening is not None:
            await listening()
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(failed.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
    finally:
        code = 0 if stop.is_set() or not failed.is_set() else 1
        deadline = time.monotonic() + _stop_within(config.shutdown_grace)
        if before_stop is not None and stop.is_set():
            await before_stop(max(0.0, deadline - time.monotonic() - CLOSE_SECONDS))
        await _stop(runner, max(CLOSE_SECONDS / 2, deadline - time.monotonic()))
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


def _beyond_loopback(host: str) -> bool:
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a wildcard ("") or a name: assume other machines can reach it


def warn_if_open(config: ServerConfig) -> None:
    """Say so when anyone who can reach the server may use it."""
    if _beyond_loopback(config.host) and config.api_key is None:
        log.warning(
            "listening on %s without an API key: anyone who can reach this address can start "
            "sessions and upload photos; set --api-key (or $LIPSYNC_API_KEY)",
            config.host,
        )
