"""End to end: a real aiortc peer streams speech and receives the lip-synced video and audio."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from rtc_server.peer import LipSyncPeer
from signaling.config import ServerConfig
from signaling.server import build_app
from signaling.sessions import SESSIONS
from wav2lip.animator import Animator

pytestmark = pytest.mark.slow

SILENCE = 2.0  # seconds before and after the speech


def _speech_with_silence(speech: np.ndarray) -> np.ndarray:
    pad = np.zeros(int(SILENCE * 16000), np.float32)
    return np.concatenate((pad, speech, pad))


async def _start(engine, **config) -> TestServer:
    app = build_app(ServerConfig(offline=True, **config), engine=engine)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def _upload(http: aiohttp.ClientSession, server: TestServer, photo: Path) -> dict:
    async with http.post(
        server.make_url("/api/avatars"),
        data=photo.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
    ) as response:
        assert response.status == 201
        return await response.json()


def _mouth(box: list[int]):
    x1, y1, x2, y2 = box
    top = y1 + (y2 - y1) * 55 // 100
    return lambda image: image[top:y2, x1:x2].astype(np.int16)


def _rest_difference(kept: list[np.ndarray]) -> np.ndarray:
    """Mean absolute difference of each mouth crop from the resting (first) one."""
    rest = kept[0]
    return np.array([np.abs(k - rest).mean() for k in kept])


async def _run_session(server, http, avatar, audio, seconds, receive_audio=True):
    peer = LipSyncPeer(
        str(server.make_url("/")),
        audio,
        avatar=avatar["id"],
        receive_audio=receive_audio,
        keep=_mouth(avatar["face"]["box"]),
    )
    await peer.connect(http)
    await asyncio.sleep(seconds)
    return peer


async def test_speech_moves_the_mouth_in_sync(faces_dir, speech_16k) -> None:
    server = await _start(Animator())
    audio = _speech_with_silence(speech_16k)
    duration = len(audio) / 16000
    try:
        async with aiohttp.ClientSession() as http:
            avatar = await _upload(http, server, faces_dir / "obama.jpg")
            peer = await _run_session(server, http, avatar, audio, duration + 1.0)
            manager = server.app[SESSIONS]
            session = manager.sessions[peer.session_id]
            assert await peer.close(http) == 204
            await asyncio.sleep(0.2)
            async with http.get(server.make_url("/api/health")) as response:
                health = await response.json()
            async with http.delete(server.make_url(f"/api/sessions/{peer.session_id}")) as r:
                assert r.status == 404
    finally:
        await server.close()

    video = peer.received.video
    times = np.array([t for t, _, _ in video])
    # Delivery: 25 fps once flowing (measured over the steady middle of the run).
    steady = times[(times > times[0] + 1.0) & (times < times[-1] - 0.5)]
    fps = (len(steady) - 1) / (steady[-1] - steady[0])
    assert fps >= 24, fps
    pts = np.array([p for _, p, _ in video])
    assert np.all(np.diff(pts) > 0) and np.all(np.diff(pts) % 3600 == 0)

    # The mouth rests in the silence and moves in the speech. Frame n shows the audio sent
    # n frames after the clock started, so it arrives `delay` after that audio was sent.
    start = peer.speech.started_at
    shown = times - session.options.delay - start  # the audio time each frame shows
    # (The first half second is left out: the encoder starts at a low bitrate, and its
    # artefacts would count as movement.)
    silent = (shown > 0.3) & (shown < SILENCE - 0.4) & (times > times[0] + 0.5)
    speaking = (shown > SILENCE + 0.3) & (shown < duration - SILENCE - 0.3)
    assert silent.sum() > 5 and speaking.sum() > 40
    crops = np.stack([k for _, _, k in video])
    rest = np.median(crops[silent], axis=0)
    moved = np.abs(crops - rest).mean(axis=(1, 2, 3))
    assert moved[silent].max() < 1.5
    assert moved[speaking].mean() > 4 * max(moved[silent].mean(), 0.5)

    # The returned audio is in sync with the video: sound and mouth start together. Frame n
    # goes out with audio sample n*640, but shows the mel window of the 0.2 s from there
    # (the official alignment), so the mouth may lead the sound by up to about 0.1 s.
    audio_times = np.array([t for t, _ in peer.received.audio])
    loud = np.array([np.sqrt(np.mean((s / 32768.0) ** 2)) for _, s in peer.received.audio])
    sound_onset = audio_times[np.argmax(loud > 0.02)]
    after_rest = np.flatnonzero(silent)[-1]
    mouth_onset = times[after_rest + np.argmax(moved[after_rest:] > 3.0)]
    assert -0.05 < sound_onset - mouth_onset < 0.16, (sound_onset - start, mouth_onset - start)

    # Stats and speaking events arrived on the events channel.
    kinds = {e["type"] for e in peer.received.events}
    assert {"stats", "speaking"} <= kinds
    stats = [e for e in peer.received.events if e["type"] == "stats"]
    assert stats[-1]["engine"] == "animator" and stats[-1]["delivered_fps"] >= 23

    # Everything the session held is gone.
    assert health["sessions"] == 0
    assert session.closed and not session._tasks and session.face is None
    assert session.video_track.readyState == "ended"
    assert manager.scheduler.pending() == 0
