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
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import aiohttp
import av
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
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
    audio: list[tuple[float, int, np.ndarray]] = field(default_factory=list)  # (time, pts, mono)
    events: list[dict[str, Any]] = field(default_factory=list)


def _luma(frame: av.VideoFrame) -> np.ndarray:
    """The Y plane of a decoded yuv420p frame, without its row padding."""
    plane = frame.planes[0]
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]


class Recorder(Protocol):
    """Takes what a session sends back, as it arrives (client/recording.py writes an MP4)."""

    def video(self, frame: av.VideoFrame, arrived: float) -> None: ...

    def audio(self, received: av.AudioFrame, arrived: float) -> None: ...


class _Receiver:
    """A connection to a lipsync server that records the video and audio it receives.

    `keep` turns each received video frame's luma plane (an (H, W) uint8 array: cheap, with
    no colour conversion) into what is recorded, e.g. a crop of the mouth, so long runs do not
    hold every full frame in memory. A program that runs for hours and takes the media as it
    comes (a `recorder`) passes `history=False`: then nothing is kept in `received`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        receive_audio: bool = True,
        keep: Callable[[np.ndarray], Any] = lambda image: None,
        token: str | None = None,
        recorder: Recorder | None = None,
        history: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.recorder = recorder
        self.receive_audio = receive_audio
        self._history = history
        # The server's API key or a token minted with it, when the server requires one.
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session_id: str | None = None
        self.received = Received()
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
                arrived = time.monotonic()
                if self._history:
                    self.received.video.append((arrived, frame.pts, self._keep(_luma(frame))))
                if self.recorder is not None:
                    self.recorder.video(frame, arrived)

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, av.AudioFrame)
                arrived = time.monotonic()
                if self._history:
                    mono = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
                    audio = (arrived, frame.pts or 0, mono.astype(np.float32) / 32768)
                    self.received.audio.append(audio)
                if self.recorder is not None:
                    self.recorder.audio(frame, arrived)

    async def _hang_up(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._pc.close()


class _Caller(_Receiver, ABC):
    """A session of one's own: the offer goes to POST /api/sessions, with an `events` data
    channel whose messages are recorded; `close` ends the session."""

    def __init__(
        self,
        base_url: str,
        *,
        avatar: str | None = None,
        receive_audio: bool = True,
        video_codec: str | None = None,
        keep: Callable[[np.ndarray], Any] = lambda image: None,
        token: str | None = None,
        recorder: Recorder | None = None,
        history: bool = True,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(
            base_url,
            receive_audio=receive_audio,
            keep=keep,
            token=token,
            recorder=recorder,
            history=history,
        )
        self.avatar = avatar
        self._on_event_hook = on_event
        self._video_codec = video_codec  # e.g. "H264" or "VP8": offered first
        self._events: RTCDataChannel | None = None

    @abstractmethod
    def _add_audio(self, pc: RTCPeerConnection) -> None:
        """The audio m-line of the offer."""

    def _request(self) -> dict[str, Any]:
        """What the offer's JSON says besides the SDP."""
        return {} if self.avatar is None else {"avatar": self.avatar}

    async def connect(self, http: aiohttp.ClientSession) -> None:
        pc = self._pc
        self._add_audio(pc)
        video = pc.addTransceiver("video", direction="recvonly")
        if self._video_codec is not None:
            wanted = f"video/{self._video_codec}".lower()
            codecs = RTCRtpSender.getCapabilities("video").codecs
            video.setCodecPreferences(
                [c for c in codecs if c.mimeType.lower() == wanted]
                + [c for c in codecs if c.mimeType.lower() != wanted]
            )
        self._events = channel = pc.createDataChannel("events")
        channel.on("message", self._on_event)
        pc.on("track", self._record)

        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", **self._request()}
        url = f"{self.base_url}/api/sessions"
        async with http.post(url, json=body, headers=self._headers) as response:
            answer = await response.json()
            if response.status != 201:
                raise RuntimeError(f"session refused: {response.status} {answer}")
        self.session_id = answer["id"]
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    def _on_event(self, message: str) -> None:
        """An event from the server, with when it arrived (time.monotonic()) added."""
        event = {**json.loads(message), "received_at": time.monotonic()}
        if self._history:
            self.received.events.append(event)
        if self._on_event_hook is not None:
            self._on_event_hook(event)

    def send(self, message: dict[str, Any]) -> None:
        """A control message on the events channel (clear_buffer, end_of_segment)."""
        if self._events is None or self._events.readyState != "open":
            raise RuntimeError("the events channel is not open yet")
        self._events.send(json.dumps(message))

    async def close(self, http: aiohttp.ClientSession) -> int | None:
        """End the session (DELETE) and the connection; returns the DELETE's status."""
        status = None
        if self.session_id is not None:
            url = f"{self.base_url}/api/sessions/{self.session_id}"
            async with http.delete(url, headers=self._headers) as resp:
                status = resp.status
        await self._hang_up()
        return status


class LipSyncPeer(_Caller):
    """One session with a lipsync server: a microphone's audio goes up in real time (the
    samples given, 16 kHz mono float, then silence), the video (and the audio) come back."""

    def __init__(self, base_url: str, audio: np.ndarray | SpeechTrack, **options: Any) -> None:
        super().__init__(base_url, **options)
        self.speech = audio if isinstance(audio, SpeechTrack) else SpeechTrack(audio)

    def _add_audio(self, pc: RTCPeerConnection) -> None:
        pc.addTransceiver(self.speech, direction="sendrecv" if self.receive_audio else "sendonly")


class LipSyncPusher(_Caller):
    """A session whose audio a program pushes, as a voice agent does with its speech: as fast
    as it likes (`push`), played out at real time; `end_of_segment` closes an utterance and
    `clear_buffer` drops what is not yet shown. The server's `playback_started` and
    `playback_finished` events are recorded with the others in `received.events`."""

    def __init__(self, base_url: str, sample_rate: int = 16_000, **options: Any) -> None:
        super().__init__(base_url, **options)
        self.sample_rate = sample_rate
        self._audio: RTCDataChannel | None = None

    def _add_audio(self, pc: RTCPeerConnection) -> None:
        if self.receive_audio:
            pc.addTransceiver("audio", direction="recvonly")
        self._audio = pc.createDataChannel("audio")

    def _request(self) -> dict[str, Any]:
        return {**super()._request(), "input": "push", "sample_rate": self.sample_rate}

    async def wait_open(self, timeout: float = 20.0) -> None:
        """Until both data channels are open: pushing may begin."""
        async with asyncio.timeout(timeout):
            while not all(c and c.readyState == "open" for c in (self._audio, self._events)):
                await asyncio.sleep(0.02)

    async def push(
        self, samples: np.ndarray, speed: float = float("inf"), chunk_seconds: float = 0.1
    ) -> None:
        """Push mono float samples (at `sample_rate`) as PCM s16le, `speed` times real time
        (by default all at once)."""
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
        step = max(1, int(chunk_seconds * self.sample_rate))
        started = time.monotonic()
        for first in range(0, len(pcm), step):
            self.send_pcm(pcm[first : first + step].tobytes())
            due = started + (first + step) / self.sample_rate / speed
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    def send_pcm(self, pcm: bytes) -> None:
        """Push PCM s16le mono at `sample_rate`, as it is."""
        if self._audio is None or self._audio.readyState != "open":
            raise RuntimeError("the audio channel is not open yet (connect, then wait_open)")
        self._audio.send(pcm)

    def end_of_segment(self) -> None:
        self.send({"type": "end_of_segment"})

    def clear_buffer(self) -> None:
        self.send({"type": "clear_buffer"})


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
        if self.receive_audio:
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
