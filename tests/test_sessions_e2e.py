"""End to end: a real aiortc peer streams speech and receives the lip-synced video and audio."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from client.peer import LipSyncPeer, SpeechTrack
from signaling.config import ServerConfig
from signaling.server import SESSIONS, build_app
from wav2lip.animator import Animator

pytestmark = pytest.mark.slow

SILENCE = 3.0  # seconds before and after the speech (a slow first start loses some)


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


def _shown(session, times: np.ndarray) -> np.ndarray:
    """The time in the peer's own audio that frames received at `times` show.

    A frame goes out `delay` after the session time it shows; the peer's first sample sits
    where it arrived on the session's timeline.
    """
    session_time = times - session.options.delay - session.clock.origin
    return session_time - session._microphone.first_index / 16000


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

    # The mouth rests in the silence and moves in the speech.
    shown = _shown(session, times)
    # (The first half second is left out: the encoder starts at a low bitrate, and its
    # artefacts would count as movement.)
    silent = (shown > 0.3) & (shown < SILENCE - 0.4) & (times > times[0] + 0.5)
    speaking = (shown > SILENCE + 0.3) & (shown < duration - SILENCE - 0.3)
    assert silent.sum() > 5 and speaking.sum() > 40
    crops = np.stack([k for _, _, k in video])
    rest = np.median(crops[silent], axis=0)
    moved = np.abs(crops - rest).mean(axis=(1, 2))
    assert moved[silent].max() < 1.5
    assert moved[speaking].mean() > 4 * max(moved[silent].mean(), 0.5)

    # The returned audio is in sync with the video: sound and mouth start together. Frame n
    # goes out with audio sample n*640, but shows the mel window of the 0.2 s from there
    # (the official alignment), so the mouth may lead the sound by up to about 0.1 s.
    audio_times = np.array([t for t, _, _ in peer.received.audio])
    loud = np.array([np.sqrt(np.mean(s**2)) for _, _, s in peer.received.audio])
    sound_onset = audio_times[np.argmax(loud > 0.02)]
    after_rest = np.flatnonzero(silent)[-1]
    mouth_onset = times[after_rest + np.argmax(moved[after_rest:] > 3.0)]
    assert -0.05 < sound_onset - mouth_onset < 0.16, (sound_onset, mouth_onset)

    # Stats and speaking events arrived on the events channel.
    kinds = {e["type"] for e in peer.received.events}
    assert {"stats", "speaking"} <= kinds
    stats = [e for e in peer.received.events if e["type"] == "stats"]
    assert stats[-1]["engine"] == "animator" and stats[-1]["delivered_fps"] >= 23

    # Everything the session held is gone.
    assert health["sessions"] == 0
    assert session.closed and not session._tasks and session.face is None
    assert session.tracks and all(track.readyState == "ended" for track in session.tracks)
    assert manager.scheduler.pending() == 0


def _loudness(audio: np.ndarray, times: np.ndarray) -> np.ndarray:
    """RMS of the audio in the 0.2 s after each session time (what a frame's window hears)."""
    out = []
    for t in times:
        chunk = audio[max(0, int(t * 16000)) : max(0, int((t + 0.2) * 16000))]
        out.append(np.sqrt(np.mean(chunk**2)) if len(chunk) else 0.0)
    return np.array(out)


async def test_sessions_get_their_own_face_and_audio(faces_dir, speech_16k) -> None:
    # Small videos: the test's own peers decode both streams on the same two cores.
    server = await _start(Animator(), video_max_width=640, video_max_height=360)
    gap = np.zeros(int(2.5 * 16000), np.float32)
    early = np.concatenate((gap[:8000], speech_16k, gap, gap))
    late = np.concatenate((gap, gap[:8000], speech_16k, gap))
    try:
        async with aiohttp.ClientSession() as http:
            avatars = [
                await _upload(http, server, faces_dir / "obama.jpg"),
                await _upload(http, server, faces_dir / "lin-manuel-miranda.png"),
            ]
            peers = []
            for avatar, audio in zip(avatars, (early, late)):
                peers.append(
                    LipSyncPeer(
                        str(server.make_url("/")),
                        audio,
                        avatar=avatar["id"],
                        receive_audio=False,
                        keep=_mouth(avatar["face"]["box"]),
                    )
                )
            sizes = []
            for peer, avatar in zip(peers, avatars):
                peer._keep = (lambda keep: lambda image: (image.shape, keep(image)))(peer._keep)
                await peer.connect(http)
                sizes.append((avatar["height"], avatar["width"]))
            await asyncio.sleep(len(early) / 16000 + 0.5)
            sessions = [server.app[SESSIONS].sessions[p.session_id] for p in peers]
            for peer in peers:
                assert await peer.close(http) == 204
    finally:
        await server.close()

    correlations = []
    for peer, size, session in zip(peers, sizes, sessions):
        video = peer.received.video
        assert {shape for _, _, (shape, _) in video} == {size}  # its own photo
        times = np.array([t for t, _, _ in video])
        steady = times[times > times[0] + 1.0]
        assert (len(steady) - 1) / (steady[-1] - steady[0]) >= 24
        crops = np.stack([crop for _, _, (_, crop) in video])
        moved = np.abs(np.diff(crops, axis=0)).mean(axis=(1, 2))
        shown = _shown(session, times[1:])
        warm = times[1:] > times[0] + 0.5  # past the encoder's low-bitrate start
        correlations.append(
            [
                np.corrcoef(moved[warm], _loudness(audio, shown[warm]))[0, 1]
                for audio in (early, late)
            ]
        )
    # Each mouth follows its own audio, not the other session's.
    (own_a, other_a), (other_b, own_b) = correlations
    assert own_a > 0.3 and own_b > 0.3, correlations
    assert own_a > other_a + 0.3 and own_b > other_b + 0.3, correlations


@pytest.mark.parametrize(
    ("backend", "max_batch", "shown"),
    [
        ("auto", None, ("onnxruntime", 1)),
        ("onnxruntime-int8", None, ("onnxruntime-int8", 2)),
        ("onnxruntime", 2, ("onnxruntime", 2)),
    ],
)
async def test_wav2lip_on_cpu_keeps_25_fps_with_bounded_lag(
    faces_dir, speech_16k, checkpoint_path, backend, max_batch, shown
) -> None:
    """Wav2Lip on this CPU: most frames inferred (all, when the two cores are not busy with
    anything else); whatever is missed, delivery and lag must not suffer. The same with the
    quantized backend (batches of up to two by default) and with `--max-batch`."""
    # The server loads random weights saved in the official training layout.
    server = await _start(
        None, checkpoint=checkpoint_path, device="cpu", backend=backend, max_batch=max_batch
    )
    audio = _speech_with_silence(speech_16k)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.make_url("/api/health")) as response:
                worker = (await response.json())["workers"][0]
            assert (worker["backend"], worker["max_batch"]) == shown, worker
            assert server.app[SESSIONS].scheduler.max_batch == shown[1]
            avatar = await _upload(http, server, faces_dir / "obama.jpg")
            peer = await _run_session(server, http, avatar, audio, 6.0, receive_audio=False)
            session = server.app[SESSIONS].sessions[peer.session_id]
            stats = session.stats()
            assert await peer.close(http) == 204
    finally:
        await server.close()
    times = np.array([t for t, _, _ in peer.received.video])
    steady = times[times > times[0] + 1.0]
    assert (len(steady) - 1) / (steady[-1] - steady[0]) >= 24
    # Frames really inferred, or in silence the cached silent mouth.
    fresh = stats["generated"] + stats["silent"]
    assert fresh >= stats["delivered"] // 2 and stats["silent"] > 0
    # Each delivered frame is a new one or a repeat of the last one.
    assert stats["delivered"] - stats["repeated"] <= fresh
    # Lag stays at the configured delay (plus scheduling noise), never growing.
    assert stats["lag_ms"] < session.options.delay * 1000 + 150
    reports = [e for e in peer.received.events if e["type"] == "stats"]
    # After the first second (connection start-up), every report's lag is the delay.
    steady_reports = reports[1:]
    bound = session.options.delay * 1000 + 150
    assert steady_reports and all(r["lag_p95_ms"] < bound for r in steady_reports), reports
    assert reports[-1]["engine"] == "wav2lip"


class _StallingTrack(SpeechTrack):
    """Speaks, then stops sending entirely, as a muted or frozen microphone may."""

    def __init__(self, samples: np.ndarray) -> None:
        super().__init__(samples)
        self._frames = len(samples) // 320

    async def recv(self):
        if self._index >= self._frames:
            await asyncio.Event().wait()  # never again
        return await super().recv()


async def test_video_keeps_flowing_when_the_microphone_stalls(faces_dir, speech_16k) -> None:
    server = await _start(Animator(), video_max_width=640, video_max_height=360)
    audio = np.concatenate((np.zeros(8000, np.float32), speech_16k))
    try:
        async with aiohttp.ClientSession() as http:
            avatar = await _upload(http, server, faces_dir / "obama.jpg")
            peer = LipSyncPeer(
                str(server.make_url("/")),
                _StallingTrack(audio),
                avatar=avatar["id"],
                receive_audio=False,
                keep=_mouth(avatar["face"]["box"]),
            )
            await peer.connect(http)
            await asyncio.sleep(len(audio) / 16000 + 3.0)
            session = server.app[SESSIONS].sessions[peer.session_id]
            assert await peer.close(http) == 204
    finally:
        await server.close()
    times = np.array([t for t, _, _ in peer.received.video])
    stalled = times > session._microphone.last_media + session.options.delay + 0.6
    assert stalled.sum() > 40  # two seconds and more after the microphone went quiet
    stalled_times = times[stalled]
    assert (len(stalled_times) - 1) / (stalled_times[-1] - stalled_times[0]) >= 24
    crops = np.stack([k for _, _, k in peer.received.video])
    moved = np.abs(np.diff(crops, axis=0)).mean(axis=(1, 2))
    # A resting mouth (allowing the odd keyframe, whose new coding noise shows as a blip).
    assert np.percentile(moved[stalled[1:]], 95) < 1.5
    assert moved[~stalled[1:]].max() > 3.0  # it did move while there was speech
