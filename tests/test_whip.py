"""WHIP ingest and WHEP egress against the real server, with aiortc as both encoder and player
(the clients others wrote are in tests/test_clients.py)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from client.peer import LipSyncPeer, LipSyncViewer, SpeechTrack
from signaling.server import SESSIONS
from tests.servers import SDP, ingest, serving

pytestmark = pytest.mark.slow


def _speech(seconds: float = 20.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


async def _until(condition, timeout: float, what: str) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, what
        await asyncio.sleep(0.05)


async def test_whip_feeds_a_session_that_whep_viewers_watch() -> None:
    settings = dict(ice_servers=("stun:127.0.0.1:3478", "turn:127.0.0.1:3478"), turn_secret="s")
    async with serving(**settings) as (app, url), aiohttp.ClientSession() as http:
        pc, response = await ingest(http, f"{url}/whip", _speech())
        assert response.status == 201, await response.text()
        assert response.headers["Content-Type"] == "application/sdp"
        location = response.headers["Location"]
        session_id = location.removeprefix("/whip/")
        links = response.headers.getall("Link")
        assert '<stun:127.0.0.1:3478>; rel="ice-server"' in links
        turn = next(link for link in links if link.startswith("<turn:"))
        assert 'username="' in turn and 'credential="' in turn and "credential-type" in turn
        session = app[SESSIONS].sessions[session_id]
        assert "m=video" not in (await response.text())  # the encoder gets no video back

        # Two viewers watch: the video and the audio, each frame made once for both.
        viewers = [
            LipSyncViewer(url, session_id, keep=lambda image: float(image.mean())) for _ in range(2)
        ]
        for viewer in viewers:
            await viewer.connect(http)
        await _until(lambda: all(len(v.received.video) >= 50 for v in viewers), 20, "video")
        await _until(lambda: all(len(v.received.audio) >= 50 for v in viewers), 5, "audio")
        for viewer in viewers:
            times = [t for t, _, _ in viewer.received.video[-40:]]
            assert (len(times) - 1) / (times[-1] - times[0]) > 20  # paced at 25 fps
        assert session.delivered <= max(len(v.received.video) for v in viewers) + 30
        loud = max(float(np.abs(chunk).max()) for _, _, chunk in viewers[0].received.audio)
        assert loud > 0.05  # the encoder's sound, returned to the viewers

        async with http.delete(f"{url}{viewers[0].location}") as response:
            assert response.status == 200
        assert len(session.viewers) == 1
        async with http.delete(f"{url}{viewers[0].location}") as response:
            assert response.status == 404
        async with http.delete(f"{url}{location}") as response:
            assert response.status == 200
        assert not app[SESSIONS].sessions
        for viewer in viewers:
            viewer.location = None
            await viewer.close(http)
        await pc.close()


async def test_whep_watches_a_page_session_and_whip_refuses_what_it_cannot_use() -> None:
    async with serving() as (_app, url), aiohttp.ClientSession() as http:
        caller = LipSyncPeer(url, _speech())
        await caller.connect(http)
        assert caller.session_id is not None
        viewer = LipSyncViewer(url, caller.session_id, receive_audio=False)
        await viewer.connect(http)
        await _until(lambda: len(viewer.received.video) >= 25, 20, "the viewer's video")
        assert len(caller.received.video) > 0

        async with http.post(f"{url}/whip", data="v=0\r\n", headers={}) as response:
            assert response.status == 415
        async with http.post(f"{url}/whip", data=b"\xff\xfe", headers=SDP) as response:
            assert response.status == 400
        async with http.post(f"{url}/whep/nope", data="v=0\r\n", headers=SDP) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "session_not_found"
        async with http.patch(f"{url}/whip/{caller.session_id}") as response:
            assert response.status == 405
        # A viewer that would send audio, and an encoder that sends none: 400.
        sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        sender.addTransceiver(SpeechTrack(_speech(1)), direction="sendonly")
        sender.addTransceiver("video", direction="recvonly")
        await sender.setLocalDescription(await sender.createOffer())
        async with http.post(
            f"{url}/whep/{caller.session_id}", data=sender.localDescription.sdp, headers=SDP
        ) as response:
            assert response.status == 400 and "send nothing" in await response.text()
        silent = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        silent.addTransceiver("audio", direction="recvonly")
        await silent.setLocalDescription(await silent.createOffer())
        async with http.post(
            f"{url}/whip", data=silent.localDescription.sdp, headers=SDP
        ) as response:
            assert response.status == 400 and "must send an audio" in await response.text()
        for pc in (sender, silent):
            await pc.close()
        await viewer.close(http)
        await caller.close(http)


async def test_whip_and_whep_take_bearer_tokens() -> None:
    key = "a key for the whip test, 32 chars"
    async with serving(api_key=key) as (_app, url), aiohttp.ClientSession() as http:
        pc, response = await ingest(http, f"{url}/whip", _speech())
        assert response.status == 401
        await pc.close()
        async with http.post(f"{url}/api/tokens", headers={"Authorization": f"Bearer {key}"}) as r:
            token = (await r.json())["token"]
        bearer = {"Authorization": f"Bearer {token}"}
        pc, r = await ingest(http, f"{url}/whip", _speech(), bearer)
        assert r.status == 201
        location = r.headers["Location"]
        viewer = LipSyncViewer(url, location.removeprefix("/whip/"))
        with pytest.raises(RuntimeError, match="401"):
            await viewer.connect(http)
        await viewer.close(http)
        async with http.delete(f"{url}{location}", headers=bearer) as r:
            assert r.status == 200
        await pc.close()
