"""Draining the peer's microphone track onto the session timeline.

aiortc decodes Opus to 48 kHz stereo; PyAV's resampler turns it into 16 kHz mono. Each frame is
placed by its RTP timestamp (unwrapped), so lost packets leave silence and the audio keeps its
true timing. The track is always drained, even when nobody needs its audio: aiortc never drops
a frame, and an undrained track grows without bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from fractions import Fraction

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from rtc_server.timeline import SAMPLE_RATE, AudioTimeline

log = logging.getLogger(__name__)

_WRAP = 1 << 32  # RTP timestamps are 32-bit
# During the first second of audio the anchor may still move earlier (see `_index`).
ANCHOR_FRAMES = 50
# After that, clock drift between the peer and the server is followed: every DRIFT_FRAMES the
# earliest arrival relative to its place is brought back to zero, DRIFT_STEP samples at a time,
# once it is off by more than DRIFT_TOLERANCE; and at once when it is off by more than
# JUMP_TOLERANCE, which no drift explains: a hold-up longer than the anchoring second (a stalled
# start), that would otherwise stay in the lag for minutes.
DRIFT_FRAMES = 100
DRIFT_TOLERANCE = SAMPLE_RATE // 50
DRIFT_STEP = SAMPLE_RATE // 50
JUMP_TOLERANCE = SAMPLE_RATE // 10


class Microphone:
    """Reads a remote audio track until it ends, writing 16 kHz mono samples to a timeline."""

    def __init__(
        self,
        track: MediaStreamTrack,
        timeline: AudioTimeline,
        session_time: Callable[[], float],
        on_audio: Callable[[int, float], None],
        on_late: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self._track = track
        self._on_late = on_late  # how late each frame came after its place (once anchored)
        self._timeline = timeline
        self._session_time = session_time
        self._on_audio = on_audio
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._first_pts: int | None = None
        # The timeline index of the peer's first sample: where its audio is anchored. It moves
        # when the first packet turns out to have been held up, and to follow clock drift.
        self.first_index = 0
        self._earliest = 0  # the least (arrival - place) seen in the current drift window
        self._last_pts = 0
        self._unwrapped = 0
        self.last_media = time.monotonic()
        self.frames = 0
        self.ended = False  # the track has ended: no more audio will come

    def _index(self, pts: int, time_base: Fraction, duration: int) -> int:
        """The session-timeline sample index of a frame with this RTP timestamp.

        A frame of `duration` samples arrives once its last sample was captured, so a frame
        that arrives without delay is placed to end, not start, when it arrives: anchoring
        its start there would hold every sound back by a packet (20 ms) for the whole session.
        """
        if self._first_pts is None:
            self._first_pts = self._last_pts = pts
            self.first_index = round(self._session_time() * SAMPLE_RATE) - duration
        delta = (pts - self._last_pts) % _WRAP
        if delta > _WRAP // 2:  # reordered: slightly in the past
            delta -= _WRAP
        self._last_pts = pts
        self._unwrapped += delta
        index = self.first_index + round(self._unwrapped * time_base * SAMPLE_RATE)
        arrived = round(self._session_time() * SAMPLE_RATE) - duration  # where its start belongs
        if index > arrived and self.frames <= ANCHOR_FRAMES:
            # This frame came sooner than the first one implied: the first was held up on its
            # way (connection start-up). Move the anchor, or that hold-up would be added to
            # the lag for the whole session.
            self.first_index -= index - arrived
            index = arrived
        index += self._follow_drift(arrived - index)
        if self.frames > ANCHOR_FRAMES:
            # How long after its place the frame's first sample came: the packet's length
            # (it is sent once its last sample is captured) and the network's jitter.
            self._on_late((arrived + duration - index) / SAMPLE_RATE)
        return index

    def _follow_drift(self, early_by: int) -> int:
        """Nudge the anchor when the peer's clock runs fast or slow against ours.

        `early_by` is how long after its place on the timeline a frame arrived. Its least
        value over a window should be about zero; if it wanders (a sender clock off by 100 ppm
        drifts 60 ms in ten minutes), the anchor follows, so audio is neither read as silence
        before it comes nor held back ever longer. Returns the shift applied now.
        """
        if self.frames <= ANCHOR_FRAMES:
            return 0
        self._earliest = min(self._earliest, early_by) if self.frames % DRIFT_FRAMES else early_by
        if self.frames % DRIFT_FRAMES != DRIFT_FRAMES - 1 or abs(self._earliest) <= DRIFT_TOLERANCE:
            return 0
        shift = self._earliest
        if abs(shift) <= JUMP_TOLERANCE:
            shift = max(-DRIFT_STEP, min(DRIFT_STEP, shift))
        else:
            log.info("microphone audio re-anchored by %.0f ms", shift * 1000 / SAMPLE_RATE)
        self.first_index += shift
        return shift

    def _place(self, frame: av.AudioFrame) -> int:
        """Write the frame's samples; return the timeline index just past them."""
        duration = round(frame.samples * SAMPLE_RATE / frame.sample_rate)
        if frame.pts is None or frame.time_base is None:
            start = self._timeline.written_end
        else:
            start = self._index(frame.pts, frame.time_base, duration)
        for out in self._resampler.resample(frame):
            samples = out.to_ndarray()[0]
            self._timeline.write(start, samples)
            start += len(samples)
        return start

    async def run(self) -> None:
        try:
            while True:
                frame = await self._track.recv()
                if not isinstance(frame, av.AudioFrame):
                    raise TypeError(f"the microphone track gave a {type(frame).__name__}")
                self.last_media = time.monotonic()
                self.frames += 1
                self._on_audio(self._place(frame), self.last_media)
        except MediaStreamError:
            log.debug("microphone track ended")
            self.ended = True
