"""The outgoing tracks: lip-synced video at 25 fps and the returned audio in 20 ms frames.

Both are paced by the session clock, not by aiortc: `recv` sleeps until its frame is due, and a
track that finds itself behind (a slow start, a stalled loop) skips ahead to the present
instead of sending old frames late, so lag can never build up.

A frame that cannot be made (a bug, say) must not stop the track quietly: aiortc would log a
warning and leave the peer with a frozen picture. The track reports the failure, which ends the
session like any other failing part, and ends itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from abc import abstractmethod
from collections.abc import Callable
from fractions import Fraction
from typing import Protocol

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from rtc_server.clock import AUDIO_FRAME_SECONDS, VIDEO_FRAME_SECONDS, SessionClock

VIDEO_CLOCK_RATE = 90_000
VIDEO_PTS_STEP = VIDEO_CLOCK_RATE // 25  # 3600
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_RATE = 16_000
AUDIO_FRAME_SAMPLES = AUDIO_RATE // 50  # 320
# How far behind schedule a track may fall before it skips ahead to the present.
MAX_BEHIND = 0.1


class FrameSource(Protocol):
    def frame_for(self, index: int, sent_at: float) -> av.VideoFrame:
        """The picture for frame `index`, its pts set: rendered, or the previous one repeated.
        Shared by every receiver of the session: not to be changed."""


class AudioSource(Protocol):
    def audio_for(self, start: int, count: int) -> np.ndarray:
        """`count` samples of the returned audio from sample `start` (16 kHz mono float)."""


async def _wait_until(due: float) -> None:
    delay = due - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _catch_up(clock: SessionClock, index: int, period: float) -> int:
    """The index to send now: `index`, or the present one if we are too far behind."""
    behind = time.monotonic() - clock.due(index * period)
    if behind > MAX_BEHIND:
        return index + math.floor(behind / period)
    return index


# Told which track failed ("video" or "audio") and how.
OnFailure = Callable[[str, Exception], None]


class _PacedTrack(MediaStreamTrack):
    """Hands out the index of each `period` of session time when it is due, and the frame
    `_frame` makes for it."""

    period: float

    def __init__(self, clock: SessionClock, on_failure: OnFailure) -> None:
        super().__init__()
        self._clock = clock
        self._index = 0
        self._on_failure = on_failure

    async def recv(self) -> av.VideoFrame | av.AudioFrame:
        await self._clock.started.wait()
        index = _catch_up(self._clock, self._index, self.period)
        await _wait_until(self._clock.due(index * self.period))
        self._index = index + 1
        try:
            return self._frame(index)
        except Exception as exc:
            self._on_failure(self.kind, exc)
            self.stop()
            raise MediaStreamError from exc

    @abstractmethod
    def _frame(self, index: int) -> av.VideoFrame | av.AudioFrame:
        """The frame that shows session time `index * period`."""


class LipSyncVideoTrack(_PacedTrack):
    kind = "video"
    period = VIDEO_FRAME_SECONDS

    def __init__(self, clock: SessionClock, source: FrameSource, on_failure: OnFailure) -> None:
        super().__init__(clock, on_failure)
        self._source = source

    def _frame(self, index: int) -> av.VideoFrame:
        return self._source.frame_for(index, time.monotonic())


class ReturnedAudioTrack(_PacedTrack):
    """The microphone's audio sent back, delayed exactly as much as the video."""

    kind = "audio"
    period = AUDIO_FRAME_SECONDS

    def __init__(self, clock: SessionClock, source: AudioSource, on_failure: OnFailure) -> None:
        super().__init__(clock, on_failure)
        self._source = source

    def _frame(self, index: int) -> av.AudioFrame:
        samples = self._source.audio_for(index * AUDIO_FRAME_SAMPLES, AUDIO_FRAME_SAMPLES)
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = index * AUDIO_FRAME_SAMPLES
        frame.time_base = Fraction(1, AUDIO_RATE)
        return frame
