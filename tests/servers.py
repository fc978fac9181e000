"""A real one-process server with the animator on 127.0.0.1 (a free port), for tests: on the
test's own event loop (`serving`), or on a thread of its own for tests that drive it from
synchronous code (Playwright's sync API, Marionette, other programs); either may look inside
it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from signaling.config import ServerConfig
from signaling.runner import app_runner
from signaling.server import build_app
from wav2lip.animator import Animator


@dataclass
class Served:
    url: str
    app: web.Application


@contextlib.asynccontextmanager
async def serving(
    engine: Any = None, delay: float | None = None, **settings: Any
) -> AsyncIterator[tuple[web.Application, str]]:
    """The server on this event loop: its app and its URL. `engine` replaces the animator;
    `delay` fixes the delay (else it follows the measured jitter)."""
    config = ServerConfig(offline=True, **settings)
    app = build_app(config, engine=Animator() if engine is None else engine, delay=delay)
    runner = app_runner(app, config)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield app, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def serve_in_thread(config: ServerConfig) -> Iterator[Served]:
    """The one-process server with the animator on 127.0.0.1 (a free port), its event loop on
    a background thread: Playwright's sync API refuses to run in a thread whose loop runs."""
    ready = threading.Event()
    state: dict = {}
    app = build_app(config, engine=Animator())

    async def main() -> None:
        runner = app_runner(app, config)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            state["stop"] = asyncio.Event()
            state["loop"] = asyncio.get_running_loop()
            state["port"] = runner.addresses[0][1]
            ready.set()
            await state["stop"].wait()
        finally:
            await runner.cleanup()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    if not ready.wait(120) or "error" in state:
        raise RuntimeError("the server did not start") from state.get("error")
    try:
        yield Served(f"http://127.0.0.1:{state['port']}", app)
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
