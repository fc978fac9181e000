"""Python peers for programs: stream audio to a lipsync server and receive the video back, or
watch someone else's session.

`LipSyncPeer` does what the browser page does, for voice agents, recorders, the tests and the
benchmarks: send an audio track paced in real time (with the default avatar or an uploaded
one), and record the lip-synced video frames, the returned audio and the `events` messages as
they arrive. `LipSyncViewer` watches a session over WHEP and records its video and audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

RATE = 48_000
FRAME_SAMPLES = RATE // 50  # 20 ms, as a browser sends


class SpeechTrack(MediaStreamTrack):
    """Plays 16 kHz mono samples as a microphone would: 20 ms frames at real-time pace,
    then silence for as long as the connection lasts."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, sample_rate: int = 16_000) -> None:
        super().__init__()
        resampled = np.interp(
            np.arange(int(len(samples) * RATE / sample_rate)) * sample_rate / RATE,
            np.arange(len(samples)),
            samples,
        )
        self._pcm = (np.clip(resampled, -1, 1) * 32767).astype(np.int16)
        self._index = 0
        self._start: float | None = None
        self.started_at: float | None = None  # time.monotonic() of the first frame sent

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = self.started_at = time.monotonic()
        due = self._start + self._index * FRAME_SAMPLES / RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        begin = self._index * FRAME_SAMPLES
        chunk = self._pcm[begin : begin + FRAME_SAMPLES]
        chunk = np.pad(chunk, (0, FRAME_SAMPLES - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = begin
        frame.time_base = Fraction(1, RATE)
        self._index += 1
        return frame


@dataclass
class Received:
    """Everything that came back, each item with its arrival time (time.monotonic())."""

    video: list[tuple[float, int, Any]] = field(default_factory=list)  # (time, pts, kept)
    audio: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (time, mono 48 kHz)
    events: list[dict[str, Any]] = field(default_factory=list)


def _luma(frame: av.VideoFrame) -> np.ndarray:
    """The Y plane of a decoded yuv420p frame, without its row padding."""
    plane = frame.planes[0]
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]


class _Receiver:
    """A connection to a lipsync server that records the video and audio it receives.

    `keep` turns each received video frame's luma plane (an (H, W) uint8 array: cheap, with
    no colour conversion) into what is recorded, e.g. a crop of the mouth, so long runs do not
    hold every full frame in memory.
    """

    def __init__(
        self,
        base_url: str,
        *,
        receive_audio: bool = True,
        keep: Callable[[np.ndarray], Any] = lambda image: None,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # The server's API key or a token minted with it, when the server requires one.
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session_id: str | None = None
        self.received = Received()
        self._receive_audio = receive_audio
        self._keep = keep
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # loopback: no STUN
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connection_state(self) -> str:
        """The peer connection's state: "connected", then "closed" or "failed" at the end."""
        return self._pc.connectionState

    def _record(self, track: MediaStreamTrack) -> None:
        reader = self._read_video if track.kind == "video" else self._read_audio
        self._tasks.append(asyncio.create_task(reader(track)))

    async def _read_video(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, av.VideoFrame) and frame.pts is not None
                kept = self._keep(_luma(frame))
                self.received.video.append((time.monotonic(), frame.pts, kept))

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, av.AudioFrame)
                samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
                self.received.audio.append((time.monotonic(), samples.astype(np.float32)))

    async def _hang_up(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._pc.close()


class LipSyncPeer(_Receiver):
    """One session with a lipsync server: the audio goes up, the video (and the audio) back."""

    def __init__(
        self,
        base_url: str,
        audio: np.ndarray | SpeechTrack,
        *,
        avatar: str | None = None,
        receive_audio: bool = True,
        video_codec: str | None = None,
        keep: Callable[[np.ndarray], Any] = lambda image: None,
        token: str | None = None,
    ) -> None:
        super().__init__(base_url, receive_audio=receive_audio, keep=keep, token=token)
        self.avatar = avatar
        self.speech = audio if isinstance(audio, SpeechTrack) else SpeechTrack(audio)
        self._video_codec = video_codec  # e.g. "H264" or "VP8": offered first

    async def connect(self, http: aiohttp.ClientSession) -> None:
        pc = self._pc
        pc.addTransceiver(self.speech, direction="sendrecv" if self._receive_audio else "sendonly")
        video = pc.addTransceiver("video", direction="recvonly")
        if self._video_codec is not None:
            wanted = f"video/{self._video_codec}".lower()
            codecs = RTCRtpSender.getCapabilities("video").codecs
            video.setCodecPreferences(
                [c for c in codecs if c.mimeType.lower() == wanted]
                + [c for c in codecs if c.mimeType.lower() != wanted]
            )
        channel = pc.createDataChannel("events")
        channel.on("message", lambda message: self.received.events.append(json.loads(message)))

        pc.on("track", self._record)

        await pc.setLocalDescription(await pc.createOffer())
        body: dict[str, Any] = {"sdp": pc.localDescription.sdp, "type": "offer"}
        if self.avatar is not None:
            body["avatar"] = self.avatar
        url = f"{self.base_url}/api/sessions"
        async with http.post(url, json=body, headers=self._headers) as response:
            answer = await response.json()
            if response.status != 201:
                raise RuntimeError(f"session refused: {response.status} {answer}")
        self.session_id = answer["id"]
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    async def close(self, http: aiohttp.ClientSession) -> int | None:
        """End the session (DELETE) and the connection; returns the DELETE's status."""
        status = None
        if self.session_id is not None:
            url = f"{self.base_url}/api/sessions/{self.session_id}"
            async with http.delete(url, headers=self._headers) as resp:
                status = resp.status
        await self._hang_up()
        return status


class LipSyncViewer(_Receiver):
    """Watches a session over WHEP: records its video and, unless `receive_audio` is False,
    its audio. `close` stops watching (DELETE on the viewer's resource)."""

    def __init__(
        self,
        base_url: str,
        session_id: str,
        *,
        receive_audio: bool = True,
        keep: Callable[[np.ndarray], Any] = lambda image: None,
        token: str | None = None,
    ) -> None:
        super().__init__(base_url, receive_audio=receive_audio, keep=keep, token=token)
        self.session_id = session_id
        self.location: str | None = None

    async def connect(self, http: aiohttp.ClientSession) -> None:
        pc = self._pc
        pc.addTransceiver("video", direction="recvonly")
        if self._receive_audio:
            pc.addTransceiver("audio", direction="recvonly")
        pc.on("track", self._record)
        await pc.setLocalDescription(await pc.createOffer())
        headers = {**self._headers, "Content-Type": "application/sdp"}
        url = f"{self.base_url}/whep/{self.session_id}"
        async with http.post(url, data=pc.localDescription.sdp, headers=headers) as response:
            answer = await response.text()
            if response.status != 201:
                raise RuntimeError(f"watching refused: {response.status} {answer}")
            self.location = response.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    async def close(self, http: aiohttp.ClientSession) -> int | None:
        """Stop watching (DELETE) and close the connection; returns the DELETE's status."""
        status = None
        if self.location is not None:
            async with http.delete(f"{self.base_url}{self.location}", headers=self._headers) as r:
                status = r.status
        await self._hang_up()
        return status
