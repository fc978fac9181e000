"""Measuring what a peer receives: where the mouth is, when sound arrives, and how long an
interruption takes to show. Shared by the tests and `bench.interrupt`, so the figure recorded
is the one the tests assert on.

The animator's mouth opens with the loudness of speech and rests, the photo unchanged, in
silence: how far the lower face is from its resting picture says whether it speaks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from client.peer import LipSyncPeer, LipSyncPusher, Received

AT_REST = 2.0  # mouth blocks this close to the resting ones (mean, in luma levels): at rest
MOVING = 3.0  # and this far: speaking
LOUD = 0.05  # a 20 ms chunk whose peak passes this has sound in it


def at_rate(speech_16k: np.ndarray, rate: int) -> np.ndarray:
    """16 kHz speech as a TTS would send it, at its own rate."""
    times = np.arange(len(speech_16k) * rate // 16_000) / rate
    return np.interp(times, np.arange(len(speech_16k)) / 16_000, speech_16k).astype(np.float32)


def sounding(samples: np.ndarray, rate: int) -> tuple[float, float]:
    """When the first and the last loud 20 ms of some audio start, in seconds into it."""
    step = rate // 50
    chunks = samples[: len(samples) // step * step].reshape(-1, step)
    loud = np.flatnonzero(np.abs(chunks).max(axis=1) > LOUD)
    return loud[0] / 50, loud[-1] / 50


def mouth_blocks(avatar: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """The lower face of an avatar (as GET /api/avatars/{id} describes it) in 8x8-pixel
    blocks: a mouth opening moves these, the video codec's fine-grained noise much less."""
    x1, y1, x2, y2 = avatar["face"]["box"]
    top = y1 + (y2 - y1) * 55 // 100
    rows, cols = (y2 - top) // 8 * 8, (x2 - x1) // 8 * 8

    def blocks(image: np.ndarray) -> np.ndarray:
        crop = image[top : top + rows, x1 : x1 + cols].astype(np.float32)
        return crop.reshape(rows // 8, 8, cols // 8, 8).mean(axis=(1, 3))

    return blocks


def moved(received: Received) -> tuple[np.ndarray, np.ndarray]:
    """Each received frame's time, and how far its mouth (kept by `mouth_blocks`) is from
    the resting one: the median of 0.3 to 0.6 s into the video, which must be silent. From
    0.3 s on, as the encoder's first frames are coarse."""
    times = np.array([t for t, _, _ in received.video])
    later = times > times[0] + 0.3
    crops = np.stack([k for (_, _, k), keep in zip(received.video, later, strict=True) if keep])
    times = times[later]
    rest = np.median(crops[times < times[0] + 0.3], axis=0)
    return times, np.abs(crops - rest).mean(axis=(1, 2))


def time_audio_packets(peer: LipSyncPeer | LipSyncPusher) -> dict[int, float]:
    """Start noting when each audio packet reaches the peer (call it right after `connect`);
    the dict fills in by RTP timestamp, counted from the first packet's.

    aiortc's receiver holds 4 audio packets (80 ms) before it decodes the first of them, a
    playout buffer of its own that a browser sizes differently: the audio's timing at the peer
    is taken where its packets arrive, as the video's is where its frames are complete.
    """
    (receiver,) = [t.receiver for t in peer._pc.getTransceivers() if t.kind == "audio"]
    arrivals: dict[int, float] = {}
    handle = receiver._handle_rtp_packet
    first: list[int] = []

    async def timed(packet: Any, arrival_time_ms: int) -> None:
        first[:] = first or [packet.timestamp]
        arrivals.setdefault((packet.timestamp - first[0]) % 2**32, time.monotonic())
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = timed  # type: ignore[method-assign]
    return arrivals


def loud(received: Received, arrivals: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """When each 20 ms of received audio reached the peer, and whether it has sound in it."""
    return (
        np.array([arrivals[pts] for _, pts, _ in received.audio]),
        np.array([np.abs(chunk).max() > LOUD for _, _, chunk in received.audio]),
    )


QUIET_BEFORE_ONSET = 10  # 20 ms chunks of quiet before a loud one make it an onset


def onsets(times: np.ndarray, loud: np.ndarray) -> np.ndarray:
    """The times of loud 20 ms chunks that follow 200 ms of quiet."""
    quiet_run = np.convolve(~loud, np.ones(QUIET_BEFORE_ONSET, int), "full")[: len(loud)]
    before = np.concatenate(([0], quiet_run[:-1]))
    return times[loud & (before >= QUIET_BEFORE_ONSET)]


def speech_to_return(
    peer: LipSyncPeer, audio: np.ndarray, arrivals: dict[int, float], window: tuple[float, float]
) -> list[float]:
    """For each onset of speech the peer sent within `window` (time.monotonic()), the seconds
    until the onset of the audio coming back reached it (its packets' arrival)."""
    started = peer.speech.started_at
    if started is None or not peer.received.audio:
        return []
    chunks = audio[: len(audio) // 320 * 320].reshape(-1, 320)
    # Chunk k left the peer at `started + 0.02 k` (SpeechTrack paces them so).
    sent = onsets(started + 0.02 * np.arange(len(chunks)), np.abs(chunks).max(axis=1) > LOUD)
    back = onsets(
        np.array([arrivals.get(pts, np.nan) for _, pts, _ in peer.received.audio]),
        np.array([np.abs(chunk).max() > LOUD for _, _, chunk in peer.received.audio]),
    )
    delays = []
    for onset in sent[(sent >= window[0]) & (sent < window[1] - 1.0)]:
        later = back[(back > onset) & (back < onset + 1.0)]
        if len(later):
            delays.append(float(later[0] - onset))
    return delays


def events(pusher: LipSyncPusher, kind: str) -> list[dict[str, Any]]:
    return [e for e in pusher.received.events if e["type"] == kind]


@dataclass
class Pushing:
    """A push session whose audio packets are timed, and the face it starts with."""

    pusher: LipSyncPusher
    arrivals: dict[int, float]
    avatar: dict[str, Any]


async def open_pushing(http: aiohttp.ClientSession, url: str, rate: int) -> Pushing:
    """A push session with the server's default avatar, once a second of its resting face
    has come (for `moved`'s reference)."""
    async with http.get(f"{url}/api/avatars/default") as response:
        avatar = await response.json()
    pusher = LipSyncPusher(url, sample_rate=rate, keep=mouth_blocks(avatar))
    await pusher.connect(http)
    arrivals = time_audio_packets(pusher)
    await pusher.wait_open()
    while not pusher.received.video:
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.0)
    return Pushing(pusher, arrivals, avatar)


@dataclass(frozen=True)
class Interruption:
    """How a clear_buffer showed at the peer, in seconds from when it was sent."""

    rest: float  # until the first frame from which on every one shows the resting mouth
    silent: float  # until the first 20 ms of audio from which on all is silent
    finished: float  # until playback_finished arrived
    position: float  # its playback_position
    heard: float  # how much of the utterance the peer heard, measured
    interrupted: bool  # its `interrupted`


async def interrupt(pushing: Pushing, speech: np.ndarray, after: float) -> Interruption:
    """Push `speech` (at the session's rate) 8 times faster than real time, send clear_buffer
    `after` seconds into its playback, and measure what the peer got. Needs a second or two
    of nothing after `after` in `speech`, and the session's first utterance."""
    pusher = pushing.pusher

    async def push() -> None:
        await pusher.push(speech, speed=8.0)
        pusher.end_of_segment()

    pushing_task = asyncio.create_task(push())
    while not events(pusher, "playback_started"):
        await asyncio.sleep(0.005)
    await asyncio.sleep(after)
    pushing_task.cancel()  # an agent that interrupts stops pushing
    cleared_at = time.monotonic()
    pusher.clear_buffer()
    await asyncio.sleep(1.5)

    times, distance = moved(pusher.received)
    later = times > cleared_at
    still = np.flatnonzero(later & (distance >= AT_REST))
    rest_from = times[still[-1] + 1] if len(still) else times[later][0]
    audio_times, sound = loud(pusher.received, pushing.arrivals)
    silent_from = audio_times[np.flatnonzero(sound)[-1] + 1]
    (finished,) = events(pusher, "playback_finished")
    # The utterance began `lead` before its first sound; the peer heard it until the silence.
    lead = sounding(speech, pusher.sample_rate)[0]
    return Interruption(
        rest=rest_from - cleared_at,
        silent=silent_from - cleared_at,
        finished=finished["received_at"] - cleared_at,
        position=finished["playback_position"],
        heard=silent_from - (audio_times[sound][0] - lead),
        interrupted=finished["interrupted"],
    )
