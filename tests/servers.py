"""A real one-process server with the animator on 127.0.0.1 (a free port), for tests: on the
test's own event loop (`serving`), or on a thread of its own for tests that drive it from
synchronous code (Playwright's sync API, Marionette, other programs); either may look inside
it. And `ingest`, a WHIP encoder to post to it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from client.peer import SpeechTrack
from signaling.config import ServerConfig
from signaling.runner import app_runner
from signaling.server import build_app
from wav2lip.animator import Animator

SDP = {"Content-Type": "application/sdp"}


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


async def ingest(
    http: aiohttp.ClientSession, url: str, audio: np.ndarray, headers: dict[str, str] | None = None
) -> tuple[RTCPeerConnection, aiohttp.ClientResponse]:
    """A WHIP encoder posting to `url`: an offer that only sends `audio`. Its connection, and
    the server's response (the answer applied when it is 201)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(SpeechTrack(audio), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    response = await http.post(
        url, data=pc.localDescription.sdp, headers={**SDP, **(headers or {})}
    )
    if response.status == 201:
        await pc.setRemoteDescription(RTCSessionDescription(await response.text(), "answer"))
    return pc, response
