"""One clock per session, shared by the microphone, the video and the returned audio.

Session time 0 is the session's start. Audio that arrives at session time t is placed at sample
t * 16000, and whatever shows session time t (a video frame, a 20 ms audio frame) is sent at
t + delay: the same fixed delay for both tracks, so they stay in sync by construction.
"""

from __future__ import annotations

import asyncio
import time

VIDEO_FRAME_SECONDS = 1 / 25
AUDIO_FRAME_SECONDS = 1 / 50


class SessionClock:
    """Starts when media starts flowing (the connection is up), not when the offer came:
    ICE and DTLS take a while, and frames due before then could only be skipped."""

    def __init__(self, delay: float) -> None:
        self.origin = time.monotonic()
        self.delay = delay
        self.started = asyncio.Event()

    def start(self) -> None:
        if not self.started.is_set():
            self.origin = time.monotonic()
            self.started.set()

    def now(self) -> float:
        """Seconds since the session started."""
        return time.monotonic() - self.origin

    def due(self, session_time: float) -> float:
        """The monotonic time at which what shows `session_time` goes out."""
        return self.origin + session_time + self.delay
