"""One call to a lipsync server, for people and scripts: `lipsync call`, or `call()` in a program.

Uploads the photo (or uses the server's default), streams an audio file (as a microphone, at
real time; or pushed, as a voice agent pushes its speech), records the returned video and
audio to an MP4, and gives back the session's figures. Built on `client.peer`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np

from client.peer import LipSyncPeer, LipSyncPusher
from client.recording import Mp4Recorder

RATE = 16_000
PUSH_SPEED = 8.0  # pushed audio goes up this many times faster than it plays
TAIL_SECONDS = 1.0  # after the audio: the server's delay, and a moment at rest
TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)


class CallError(Exception):
    """The call could not be made: the server unreachable, the photo refused, ..."""


@dataclass(frozen=True)
class CallResult:
    session_id: str
    output: Path | None
    frames: int  # video frames received
    seconds: float  # how long the call lasted
    figures: dict[str, Any]  # the server's last stats message


def read_audio(path: Path) -> np.ndarray:
    """Any audio PyAV can decode, as 16 kHz mono float."""
    try:
        with av.open(str(path)) as container:
            resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
            chunks = [
                out.to_ndarray()[0]
                for frame in container.decode(audio=0)
                for out in resampler.resample(frame)
            ]
    except (av.error.FFmpegError, IndexError) as exc:  # IndexError: no audio stream
        raise CallError(f"cannot read {path} as audio: {exc}") from None
    if not chunks:
        raise CallError(f"{path} holds no audio")
    return np.concatenate(chunks).astype(np.float32)


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        return dict(await response.json(content_type=None))
    except (ValueError, aiohttp.ContentTypeError):
        return {}


def _read_photo(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CallError(f"cannot read the photo {path}: {exc.strerror}") from None


async def _upload(http: aiohttp.ClientSession, server: str, photo: bytes, headers: dict) -> str:
    async with http.post(
        f"{server}/api/avatars",
        data=photo,
        headers={**headers, "Content-Type": "application/octet-stream"},
    ) as response:
        body = await _json(response)
        if response.status != 201:
            message = body.get("error", {}).get("message", f"status {response.status}")
            raise CallError(f"the server refused the photo: {message}")
        return str(body["id"])


async def call(
    server: str,
    audio: Path,
    *,
    face: Path | None = None,
    output: Path | None = None,
    push: bool = False,
    token: str | None = None,
    progress: Callable[[float, float], None] | None = None,
) -> CallResult:
    """Make one call; `progress(done, total)` hears of it in seconds as it goes."""
    server = server.rstrip("/")
    samples = read_audio(audio)
    photo = _read_photo(face) if face is not None else None
    duration = len(samples) / RATE
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    recorder = Mp4Recorder(output) if output is not None else None
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            try:
                async with http.get(f"{server}/api/health") as response:
                    await response.read()
            except aiohttp.ClientError as exc:
                raise CallError(f"cannot reach the server at {server} ({exc})") from None
            avatar = await _upload(http, server, photo, headers) if photo is not None else None
            options: dict[str, Any] = {"avatar": avatar, "token": token, "recorder": recorder}
            peer: LipSyncPeer | LipSyncPusher = (
                LipSyncPusher(server, **options)
                if push
                else LipSyncPeer(server, samples, **options)
            )
            try:
                await peer.connect(http)
            except RuntimeError as exc:
                raise CallError(str(exc)) from None
            try:
                if isinstance(peer, LipSyncPusher):
                    await peer.wait_open()
                    await peer.push(samples, speed=PUSH_SPEED)
                    peer.end_of_segment()
                deadline = time.monotonic() + duration + TAIL_SECONDS
                while time.monotonic() < deadline:
                    if progress is not None:
                        progress(min(duration, time.monotonic() - started), duration)
                    await asyncio.sleep(0.1)
            finally:
                await peer.close(http)
    finally:
        if recorder is not None:
            recorder.close()
    stats = [e for e in peer.received.events if e.get("type") == "stats"]
    return CallResult(
        session_id=str(peer.session_id),
        output=output,
        frames=len(peer.received.video),
        seconds=time.monotonic() - started,
        figures=stats[-1] if stats else {},
    )
