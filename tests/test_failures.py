"""The server's own failures: a failing engine or track, a peer that vanishes, a full device.

Real aiortc peers stream speech to a real server; the engines fail or crawl on purpose
(tests/faulty.py). Whatever fails, the peer is told why and its slot is freed; a failed engine
shows in health and ends the process with a non-zero code, for Docker or systemd to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest

from client.peer import LipSyncPeer
from rtc_server.scheduler import WARM_UP_RUNS, EngineFailure
from rtc_server.session import Session
from signaling.server import SESSIONS
from tests.conftest import ROOT, free_port
from tests.faulty import FailingAnimator, SlowAnimator
from tests.servers import serving

pytestmark = pytest.mark.slow

WARM_UP_CALLS = 1 + WARM_UP_RUNS  # each batch size once (1 on a CPU), then the timed runs


def _speech(seconds: float = 6.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


async def _until(condition, timeout: float, what: str) -> float:
    """Seconds until `condition()` holds; fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def _errors(peer: LipSyncPeer) -> list[dict]:
    return [e for e in peer.received.events if e.get("type") == "error"]


async def test_an_engine_that_cannot_warm_up_stops_the_start() -> None:
    with pytest.raises(EngineFailure, match="failed to warm up"):
        async with serving(FailingAnimator(fail_after=0)):
            pass


def test_the_process_exits_non_zero_when_the_warm_up_fails() -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "tests.faulty", "--port", str(port), "--fail-after", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "failed to warm up" in result.stderr and "illegal memory access" in result.stderr


async def test_an_engine_failing_mid_run_ends_sessions_and_turns_health_degraded() -> None:
    engine = FailingAnimator(fail_after=WARM_UP_CALLS + 25)  # a second of frames, then fails
    async with serving(engine) as (app, url), aiohttp.ClientSession() as http:
        peer = LipSyncPeer(url, _speech())
        await peer.connect(http)
        await _until(lambda: _errors(peer), 15, "the error event")
        (error,) = _errors(peer)
        assert error["code"] == "engine_failed" and error["fatal"] is True
        assert "illegal memory access" in error["message"]
        await _until(lambda: peer.connection_state in ("closed", "failed"), 10, "the close")
        assert not app[SESSIONS].sessions and app[SESSIONS].failed.is_set()
        async with http.get(f"{url}/api/health") as response:
            health = await response.json()
            assert response.status == 503, health
        assert health["status"] == "degraded" and "3 batches in a row" in health["reason"]
        refused = LipSyncPeer(url, _speech())
        with pytest.raises(RuntimeError, match=r"503.*degraded"):
            await refused.connect(http)
        await refused.close(http)
        await peer.close(http)


def test_the_process_exits_non_zero_when_the_engine_fails_mid_run() -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.faulty", "--port", str(port),
         "--fail-after", str(WARM_UP_CALLS + 25)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    async def call() -> LipSyncPeer:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/api/health") as response:
                        if response.status == 200:
                            break
                assert time.monotonic() < deadline and server.poll() is None, "no server"
                await asyncio.sleep(0.2)
            peer = LipSyncPeer(url, _speech())
            await peer.connect(http)
            await _until(lambda: _errors(peer), 15, "the error event")
            await _until(lambda: server.poll() is not None, 15, "the process's exit")
            peer.session_id = None  # nothing left to DELETE: just close the connection
            await peer.close(http)
            return peer

    try:
        peer = asyncio.run(call())
        assert _errors(peer)[0]["code"] == "engine_failed"
        assert server.wait(5) == 1
    finally:
        server.kill()
        output = server.communicate()[0]
    assert "engine failed for good" in output, output[-3000:]


async def test_a_failing_track_ends_its_session_and_only_it(monkeypatch) -> None:
    real = Session.frame_for

    def frame_for(self: Session, index: int, sent_at: float):
        if index == 30 and self.id == doomed[0]:
            raise ValueError("a bug in making frame 30")
        return real(self, index, sent_at)

    doomed: list[str] = []
    monkeypatch.setattr(Session, "frame_for", frame_for)
    engine = FailingAnimator(fail_after=10**9)
    async with serving(engine, min_fps=0) as (app, url), aiohttp.ClientSession() as http:
        peers = [LipSyncPeer(url, _speech()), LipSyncPeer(url, _speech())]
        await peers[0].connect(http)
        assert peers[0].session_id is not None
        doomed.append(peers[0].session_id)
        await peers[1].connect(http)
        await _until(lambda: _errors(peers[0]), 15, "the error event")
        assert _errors(peers[0])[0]["code"] == "internal"
        assert "video" in _errors(peers[0])[0]["message"]
        await _until(lambda: len(app[SESSIONS].sessions) == 1, 5, "the session's end")
        assert peers[1].session_id in app[SESSIONS].sessions
        frames = len(peers[1].received.video)
        await asyncio.sleep(1.0)
        assert len(peers[1].received.video) >= frames + 20  # the other one runs on
        assert _errors(peers[1]) == []
        for peer in peers:
            await peer.close(http)


_PEER = """
import asyncio, sys
import aiohttp, numpy as np
from client.peer import LipSyncPeer

async def main():
    async with aiohttp.ClientSession() as http:
        peer = LipSyncPeer(sys.argv[1], np.zeros(16000, np.float32))
        await peer.connect(http)
        while not peer.received.video:
            await asyncio.sleep(0.05)
        print("receiving", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_killed_peer_frees_its_slot_within_15_seconds() -> None:
    """A killed peer sends no DTLS close; ICE's consent checks would take 30 s to notice."""
    async with serving(FailingAnimator(fail_after=10**9), min_fps=0) as (app, url):
        peer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PEER, url, cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert peer.stdout is not None
            line = await asyncio.wait_for(peer.stdout.readline(), 60)
            assert line == b"receiving\n"
            assert len(app[SESSIONS].sessions) == 1
            os.kill(peer.pid, signal.SIGKILL)
            freed = await _until(lambda: not app[SESSIONS].sessions, 20, "the slot freed")
        finally:
            with contextlib.suppress(ProcessLookupError):
                peer.kill()
            await peer.wait()
    print(f"a killed peer's slot was freed after {freed:.1f} s")
    assert 8 < freed < 15  # --peer-timeout 10 s (and not sooner: the peer was alive till then)


async def test_sessions_are_refused_beyond_what_the_device_does() -> None:
    """A device making 33 frames a second serves one session at 20 inferred fps, not four;
    `--max-sessions` stays a hard cap where the device could do more."""
    slow = serving(SlowAnimator(0.03), max_sessions=4, min_fps=20)
    async with slow as (app, url), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/api/health") as response:
            health = await response.json()
        assert 25 < health["workers"][0]["device_fps"] < 35, health
        assert (health["capacity"], health["headroom"], health["max_sessions"]) == (1, 1, 4)
        first = LipSyncPeer(url, _speech())
        await first.connect(http)
        async with http.post(
            f"{url}/api/sessions", json={"sdp": "v=0", "type": "offer"}
        ) as response:
            body = await response.json()
            assert response.status == 503 and body["error"]["code"] == "server_full"
            assert response.headers["Retry-After"] == "10"
        async with http.get(f"{url}/api/health") as response:
            health = await response.json()
        assert (health["sessions"], health["headroom"]) == (1, 0)
        await first.close(http)
    async with serving(SlowAnimator(0.001), max_sessions=2, min_fps=20) as (app, url):
        assert app[SESSIONS].capacity() == 2  # the hard cap
